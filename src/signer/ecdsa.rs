//! ECDSA over secp256k1 of a 32-byte prehash: k256's signature, byte for byte, with the
//! nonce's inverse made in a fraction of the time (docs/performance.md).
//!
//! `SigningKey::sign_prehash_recoverable` takes the nonce k from RFC 6979, inverts it by
//! Fermat's little theorem (an addition chain of about 290 scalar squarings and
//! multiplications, in constant time) and computes `R = k·G`, `r = R.x mod n`,
//! `s = k⁻¹·(z + r·d)`, then the low s. The inversion is a quarter to a third of its time
//! (docs/performance.md). [`sign_prehash`] runs the same steps, k256's own (`SignPrimitive::
//! try_sign_prehashed`, which takes the nonce as any type that inverts itself), and hands it a
//! [`BlindedNonce`]: k is multiplied by a secret blinding factor b, the product inverted in
//! variable time (Lehmer's extended gcd, ruint's `inv_mod`) and multiplied by b again,
//! `k⁻¹ = b·(k·b)⁻¹`.
//!
//! Why the variable-time step leaks nothing of k (whose bits would give the key away to a
//! lattice attack): it only ever sees `k·b`, and b is a fresh secret for every hash signed,
//! keccak-256 of the key, the hash and 32 bytes of the OS's random source ([`blinding_factor`],
//! as RFC 6979 §3.6 hedges a nonce): for b unknown and independent of k, `k·b` is uniform and
//! independent of k. The key in the hash keeps b secret should the random source fail or
//! repeat itself (a cloned VM): the same hash then gives the same k and b, so the same `k·b`,
//! nothing new. The two multiplications are k256's, in constant time, and the inverse is
//! checked (`k·k⁻¹ = 1`) before use; should the check fail, k256's constant-time inversion is
//! used (and logged). The nonce is RFC 6979's either way, so the signature is exactly k256's
//! (tests compare the two). The buffer the key is copied into for b is zeroized; like k256's
//! own path, the nonce, its inverse and other temporaries (keccak's state among them) are not.

use alloy::primitives::{B256, U256 as Uint, keccak256};
use k256::ecdsa::hazmat::SignPrimitive;
use k256::ecdsa::{RecoveryId, Signature, SigningKey};
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{Invert, Reduce};
use k256::elliptic_curve::subtle::{Choice, ConstantTimeEq as _, CtOption};
use k256::{FieldBytes, NonZeroScalar, Scalar};
use zeroize::Zeroizing;

/// The order n of secp256k1's group, big-endian: RFC 6979's `q` (a test checks it against
/// k256's).
const ORDER: [u8; 32] =
    alloy::primitives::hex!("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141");

/// n as ruint's integer (alloy's `U256`; `k256::U256` is crypto-bigint's), for `inv_mod`.
const ORDER_UINT: Uint = Uint::from_be_bytes(ORDER);

/// Sign `prehash` (already a 32-byte hash: it is the field element, as k256's `bits2field`
/// takes it) with `key`: low-s signature and recovery id, the same as
/// `key.sign_prehash_recoverable(prehash)`. `None` only where k256 would fail (r or s zero,
/// probability about 2⁻²⁵⁶).
pub(super) fn sign_prehash(key: &SigningKey, prehash: &B256) -> Option<(Signature, RecoveryId)> {
    let d = key.as_nonzero_scalar();
    let z = FieldBytes::from(prehash.0);
    // As ecdsa's `try_sign_prehashed_rfc6979` with no additional data: k is below n, so
    // `from_repr` always takes it.
    let k = rfc6979::generate_k::<k256::sha2::Sha256, _>(&d.to_repr(), &ORDER.into(), &z, &[]);
    let k = Option::<Scalar>::from(Scalar::from_repr(k))?;
    let nonce = BlindedNonce {
        k,
        blind: blinding_factor(d, &z),
    };
    let (signature, recid) = d.try_sign_prehashed(nonce, &z).ok()?;
    Some((signature, recid?))
}

#[cfg(test)]
thread_local! {
    /// The blinding factor of this thread's last nonce inverted the fast way: tests read it to
    /// see that signing takes that way, with a fresh factor (the signature alone cannot show
    /// it: the slow way gives the same bytes).
    static LAST_BLIND: std::cell::Cell<Option<Scalar>> = const { std::cell::Cell::new(None) };
}

/// A nonce and its blinding factor (`None` only where the hash gave zero, about 2⁻²⁵⁶):
/// inverted as the module's comment says.
struct BlindedNonce {
    k: Scalar,
    blind: Option<Scalar>,
}

/// What [`blinding_factor`] hashes before the key, so its hash is no other of the key's.
/// With the key, the hash and 32 random bytes, 131 bytes: one keccak block (at most 135).
const BLINDING_TAG: &[u8] = b"session-paymaster nonce blinding v1";
const _: () = assert!(BLINDING_TAG.len() + 96 <= 135);

/// The blinding factor of the nonce of `z` signed by `d`: [`hedged_blinding_factor`] of 32
/// bytes of the OS's random source. Where the source fails, its bytes are zeros (logged once):
/// b is then a secret function of the key and the hash, still unknown to whoever times the
/// inversion.
fn blinding_factor(d: &NonZeroScalar, z: &FieldBytes) -> Option<Scalar> {
    let mut random = Zeroizing::new([0u8; 32]);
    if let Err(error) = getrandom::fill(random.as_mut_slice()) {
        random.fill(0);
        static LOGGED: std::sync::Once = std::sync::Once::new();
        LOGGED.call_once(|| {
            tracing::warn!(%error, "the OS random source failed: signatures' nonces are blinded by a hash of the key and the operation alone");
        });
    }
    hedged_blinding_factor(d, z, &random)
}

/// keccak-256 of the tag, the key, the hash and `random`, reduced mod n (the bias is under
/// 2⁻¹²⁷); `None` for zero.
fn hedged_blinding_factor(d: &NonZeroScalar, z: &FieldBytes, random: &[u8; 32]) -> Option<Scalar> {
    const KEY: usize = BLINDING_TAG.len();
    const HASH: usize = KEY + 32;
    const RANDOM: usize = HASH + 32;
    let mut input = Zeroizing::new([0u8; RANDOM + 32]);
    input[..KEY].copy_from_slice(BLINDING_TAG);
    input[KEY..HASH].copy_from_slice(&d.to_repr());
    input[HASH..RANDOM].copy_from_slice(z);
    input[RANDOM..].copy_from_slice(random);
    let digest = Zeroizing::new(keccak256(input.as_slice()).0);
    let scalar = <Scalar as Reduce<k256::U256>>::reduce_bytes(&(*digest).into());
    (!bool::from(scalar.is_zero())).then_some(scalar)
}

impl AsRef<Scalar> for BlindedNonce {
    fn as_ref(&self) -> &Scalar {
        &self.k
    }
}

impl Invert for BlindedNonce {
    type Output = CtOption<Scalar>;

    fn invert(&self) -> CtOption<Scalar> {
        if let Some(blind) = self.blind {
            if let Some(inverse) = blinded_inverse(self.k, blind) {
                #[cfg(test)]
                LAST_BLIND.set(Some(blind));
                return CtOption::new(inverse, Choice::from(1));
            }
            // Not for a nonzero k and b: ruint's inverse was wrong.
            tracing::error!(
                "the blinded inverse of a signature's nonce was wrong: k256's inversion used"
            );
        }
        self.k.invert()
    }
}

/// `b·(k·b)⁻¹`, the product inverted in variable time; `None` for a zero k, or should the
/// result not be k's inverse.
fn blinded_inverse(k: Scalar, blind: Scalar) -> Option<Scalar> {
    let blinded = Uint::from_be_bytes((k * blind).to_bytes().into());
    let inverse = blinded.inv_mod(ORDER_UINT)?;
    let inverse = Option::<Scalar>::from(Scalar::from_repr(inverse.to_be_bytes().into()))? * blind;
    bool::from((inverse * k).ct_eq(&Scalar::ONE)).then_some(inverse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::keccak256;
    use proptest::prelude::*;

    fn key(seed: &[u8; 32]) -> Option<SigningKey> {
        SigningKey::from_slice(seed).ok()
    }

    fn scalar(bytes: &[u8; 32]) -> Scalar {
        <Scalar as Reduce<k256::U256>>::reduce_bytes(&(*bytes).into())
    }

    proptest! {
        /// The signature and recovery id are k256's, for any key and prehash.
        #[test]
        fn signatures_are_k256s(seed in any::<[u8; 32]>(), prehash in any::<[u8; 32]>()) {
            let key = key(&seed);
            prop_assume!(key.is_some());
            let key = key.expect("assumed");
            LAST_BLIND.set(None);
            let ours = sign_prehash(&key, &B256::from(prehash)).expect("signs");
            prop_assert!(LAST_BLIND.take().is_some(), "the nonce inverted the fast way");
            let k256s = key.sign_prehash_recoverable(&prehash).expect("k256 signs");
            prop_assert_eq!(ours, k256s);
        }

        /// The blinded inverse is the inverse, for arbitrary blinding factors; without one it
        /// is k256's constant-time inverse.
        #[test]
        fn a_blinded_nonce_inverts_to_the_nonces_inverse(
            k in any::<[u8; 32]>(),
            blind in any::<[u8; 32]>(),
        ) {
            let (k, blind) = (scalar(&k), scalar(&blind));
            prop_assume!(!bool::from(k.is_zero()) && !bool::from(blind.is_zero()));
            let expected = k.invert().expect("nonzero");
            prop_assert_eq!(blinded_inverse(k, blind), Some(expected));
            let blinded = BlindedNonce { k, blind: Some(blind) }.invert();
            prop_assert_eq!(Option::<Scalar>::from(blinded), Some(expected));
            let unblinded = BlindedNonce { k, blind: None }.invert();
            prop_assert_eq!(Option::<Scalar>::from(unblinded), Some(expected));
        }
    }

    /// Signing inverts its nonce the fast way, blinded by a factor fresh each time, even for
    /// one hash by one key.
    #[test]
    fn signing_blinds_its_nonce_afresh() -> Result<(), Box<dyn std::error::Error>> {
        let key = SigningKey::from_slice(keccak256("session-paymaster").as_slice())?;
        let prehash = keccak256("an operation");
        let mut blinds = Vec::new();
        for _ in 0..2 {
            LAST_BLIND.set(None);
            sign_prehash(&key, &prehash).ok_or("signs")?;
            blinds.push(LAST_BLIND.take().ok_or("the fast way")?);
        }
        assert_ne!(blinds[0], blinds[1]);
        assert!(!blinds.contains(&Scalar::ONE));
        Ok(())
    }

    /// The blinding factor is fresh for each signature, even of one hash by one key; without
    /// randomness it is still a function of both the key and the hash (and nonzero).
    #[test]
    fn the_blinding_factor_is_fresh_and_depends_on_the_key_and_hash() {
        let (one, two) = (
            NonZeroScalar::new(Scalar::ONE),
            NonZeroScalar::new(-Scalar::ONE),
        );
        let (one, two) = (one.expect("nonzero"), two.expect("nonzero"));
        let (z, other_z) = (FieldBytes::from([1u8; 32]), FieldBytes::from([2u8; 32]));
        let drawn = blinding_factor(&one, &z).expect("nonzero");
        assert_ne!(
            Some(drawn),
            blinding_factor(&one, &z),
            "a fresh factor each time"
        );
        let zeros = [0u8; 32];
        let fixed = hedged_blinding_factor(&one, &z, &zeros).expect("nonzero");
        assert_eq!(hedged_blinding_factor(&one, &z, &zeros), Some(fixed));
        assert_ne!(
            hedged_blinding_factor(&two, &z, &zeros),
            Some(fixed),
            "the key"
        );
        assert_ne!(
            hedged_blinding_factor(&one, &other_z, &zeros),
            Some(fixed),
            "the hash"
        );
        assert_ne!(
            hedged_blinding_factor(&one, &z, &[1u8; 32]),
            Some(fixed),
            "the random bytes"
        );
        // The factor a signature draws is one the fast inversion takes.
        let k = Scalar::from(7u64);
        assert_eq!(blinded_inverse(k, drawn), Option::from(k.invert()));
    }

    /// The edges of the scalar range: k = 1, k = n − 1 (its own inverse), and a blinding
    /// factor of n − 1; and a zero nonce has no inverse, blinded or not.
    #[test]
    fn the_edges_invert_too() {
        let minus_one = -Scalar::ONE;
        for (k, blind) in [
            (Scalar::ONE, minus_one),
            (minus_one, Scalar::ONE),
            (minus_one, minus_one),
        ] {
            let inverse = blinded_inverse(k, blind).expect("inverts");
            assert_eq!(Some(inverse), Option::from(k.invert()));
        }
        assert_eq!(blinded_inverse(minus_one, minus_one), Some(minus_one));
        assert_eq!(
            <[u8; 32]>::from(minus_one.to_bytes()),
            (ORDER_UINT - Uint::from(1)).to_be_bytes::<32>()
        );
        assert_eq!(
            FieldBytes::from(ORDER),
            k256::elliptic_curve::FieldBytesEncoding::<k256::Secp256k1>::encode_field_bytes(
                &<k256::Secp256k1 as k256::elliptic_curve::Curve>::ORDER
            )
        );
        assert_eq!(blinded_inverse(Scalar::ZERO, Scalar::ONE), None);
        let zero = BlindedNonce {
            k: Scalar::ZERO,
            blind: Some(Scalar::ONE),
        };
        assert!(bool::from(zero.invert().is_none()));
    }

    /// Known answers from another implementation: viem's `sign({ hash, privateKey })`
    /// (noble-curves, RFC 6979 too) for the key `keccak256("session-paymaster")` and the
    /// hashes `keccak256` of `i` as four big-endian bytes, `r ‖ s ‖ v` with v 27 or 28.
    #[test]
    fn a_fixed_key_signs_as_viem_does() -> Result<(), Box<dyn std::error::Error>> {
        let key = SigningKey::from_slice(keccak256("session-paymaster").as_slice())?;
        for (i, expected) in [
            (
                0u32,
                "abfc9bf5a6ce6a425fa246477a0f8fd17189fa388afedda3825dbafb3d59ef0453858c59f0de9ebc868219c98520d8df1ae615e940733e3d9001765b80a925a81b",
            ),
            (
                1,
                "4b870fbf0bc84e45f7c6c683645f69cdb2549b2b116163d06409feb5dcead7b52f59e836511d759f8db3c50f31a437643b23fd672534305eee4fa9431f4938221b",
            ),
            (
                255,
                "97da736f58206410f49fc4d7abac4d804181f6d2147a9141cda133f046c2e109000af6246bf550bad3ea215fcf508abf8c42ca0893387faba4e30399382177601c",
            ),
        ] {
            let (signature, recid) =
                sign_prehash(&key, &keccak256(i.to_be_bytes())).ok_or("signs")?;
            let mut ours = signature.to_bytes().to_vec();
            ours.push(27 + u8::from(recid.is_y_odd()));
            assert_eq!(hex::encode(ours), expected, "hash of {i}");
        }
        Ok(())
    }
}
