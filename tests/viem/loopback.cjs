// Preloaded into the Alto bundler (node --require): Alto listens on 0.0.0.0 with no option to
// change it; tests only ever talk to loopback, so bind there instead.
'use strict';
const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  const opts = args[0];
  if (opts && typeof opts === 'object' && (opts.host === '0.0.0.0' || opts.host === '::')) {
    args[0] = { ...opts, host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
