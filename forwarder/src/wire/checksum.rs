//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

#![deny(unsafe_code)]

/// Adds `data` to a running one's-complement sum (not yet folded).
#[must_use]
pub fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([*last, 0])));
    }
    acc
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

    proptest::proptest! {
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
