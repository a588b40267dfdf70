//! The one wall clock the service reads for protocol time (signature windows, session windows,
//! budget windows, the watcher's expiry releases), in whole seconds as the EntryPoint's
//! `validUntil` counts them.

/// Seconds since the Unix epoch, by this replica's clock (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
