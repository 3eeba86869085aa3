//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

#![deny(unsafe_code)]

/// Adds `data` to a running one's-complement sum (not yet folded).
///
/// Sums 8 bytes per step into a 64-bit accumulator (as big-endian 32-bit words, which is
/// the same sum modulo 0xffff since 2^16 ≡ 1), so a 64 KiB super-packet costs a few
/// microseconds rather than tens: segmentation and coalescing checksum every byte.
/// Pieces summed one after another must have even lengths, except the last.
#[must_use]
pub fn sum(acc: u32, data: &[u8]) -> u32 {
    let mut wide = u64::from(acc);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        wide += (w >> 32) + (w & 0xffff_ffff);
    }
    let mut pairs = chunks.remainder().chunks_exact(2);
    for pair in &mut pairs {
        wide += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        wide += u64::from(u16::from_be_bytes([*last, 0]));
    }
    // End-around carry down to 32 bits: 2^32 ≡ 1 (mod 0xffff), so the value is unchanged.
    while wide >> 32 != 0 {
        wide = (wide & 0xffff_ffff) + (wide >> 32);
    }
    wide as u32
}

/// Folds a running sum into the final 16-bit checksum value (complemented).
#[must_use]
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The checksum of `data` alone, ready to store in a header.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(0, data))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed
/// from `old` to `new`, without summing the data again.
#[must_use]
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check) + u32::from(!old) + u32::from(new);
    fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example bytes: the folded sum is 0xddf2, so the checksum is !0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(checksum(&[0xab]), checksum(&[0xab, 0x00]));
    }

    fn naive(data: &[u8]) -> u16 {
        let mut acc: u64 = 0;
        for (i, b) in data.iter().enumerate() {
            acc += if i % 2 == 0 { u64::from(*b) << 8 } else { u64::from(*b) };
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn large_buffers_do_not_overflow() {
        let data = vec![0xffu8; 70_000];
        assert_eq!(checksum(&data), naive(&data));
        assert_eq!(fold(sum(sum(0xffff_ffff, &data[..40_000]), &data[40_000..])), fold(sum(0xffff_ffff, &data)));
    }

    proptest::proptest! {
        #[test]
        fn wide_sum_matches_the_rfc_1071_loop(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            proptest::prop_assert_eq!(checksum(&data), naive(&data));
        }

        #[test]
        fn incremental_update_matches_full_recompute(
            mut data in proptest::collection::vec(proptest::num::u8::ANY, 2..64),
            word in 0usize..32,
            new in proptest::num::u16::ANY,
        ) {
            if data.len() % 2 == 1 { data.push(0); }
            let i = (word % (data.len() / 2)) * 2;
            let before = checksum(&data);
            let old = u16::from_be_bytes([data[i], data[i + 1]]);
            data[i..i + 2].copy_from_slice(&new.to_be_bytes());
            let after = checksum(&data);
            let inc = update(before, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            proptest::prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0));
        }
    }
}
