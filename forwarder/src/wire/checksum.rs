//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! All arithmetic here is `wrapping_*`: one's-complement sums are modular by definition
//! (the carries are folded back in explicitly), and the accumulators are sized so the
//! wrapping never actually happens; in a release build `wrapping_add` is the same `add`
//! instruction as `+`, so the lint costs the vectorised loop nothing.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::net::{Ipv4Addr, Ipv6Addr};

/// Adds `data` to a running one's-complement sum (not yet folded).
///
/// Written so that LLVM vectorizes it on baseline x86_64 (SSE2: one shift and two packed adds
/// per 16 bytes, 4–5× a scalar 8-bytes-a-step sum) without `unsafe` or intrinsics, because
/// segmentation and coalescing checksum every byte of 64 KiB super-packets:
///
/// - One's-complement sums are byte-order independent (RFC 1071 §2(B)), so the data is summed
///   as native little-endian words and the folded 16-bit result byte-swapped once at the end
///   (`swap(x) ≡ 256·x (mod 0xffff)`, and 256 times the little-endian sum is the big-endian
///   sum since 2^16 ≡ 1).
/// - Each 32-bit word `w` goes into two plain 32-bit reductions, `all` (wrapping) and `high`
///   (`w >> 16`); the low halves then sum to `all - (high << 16)` mod 2^32, which is exact
///   while that sum stays below 2^32, so the data is taken `FLUSH_WORDS` words at a time.
/// - Plain reductions over an array-converted word are what the loop vectorizer recognizes;
///   indexing the bytes one by one or keeping explicit lanes defeats it (checked in the asm).
///
/// Pieces summed one after another must have even lengths, except the last.
#[must_use]
#[inline]
pub fn sum(acc: u32, data: &[u8]) -> u32 {
    let (words, tail) = data.split_at(data.len() & !3);
    // At most 2 · 0xffff_ffff per group of 256 KiB, and under 2^17 from the tail: no overflow.
    let mut wide: u64 = words.chunks(4 * FLUSH_WORDS).map(sum_words).sum();
    wide = wide.wrapping_add(match *tail {
        [a, b, c] => u64::from(u16::from_le_bytes([a, b])).wrapping_add(u64::from(c)),
        [a, b] => u64::from(u16::from_le_bytes([a, b])),
        [a] => u64::from(a),
        _ => 0,
    });
    while wide >> 16 != 0 {
        wide = (wide & 0xffff).wrapping_add(wide >> 16);
    }
    // Back to big-endian order, then the caller's sum; one end-around carry fits it in 32 bits.
    let total = u64::from(acc).wrapping_add(u64::from((wide as u16).swap_bytes()));
    (total & 0xffff_ffff).wrapping_add(total >> 32) as u32
}

/// 32-bit words [`sum`] adds before folding: their low (and high) halves sum to at most
/// `FLUSH_WORDS · 0xffff`, which must stay below 2^32 (65 537 is the most that fits).
const FLUSH_WORDS: usize = 1 << 16;

/// The little-endian 16-bit word sum of `words` (a multiple of 4 bytes, at most
/// [`FLUSH_WORDS`] words), not folded.
#[inline]
fn sum_words(words: &[u8]) -> u64 {
    let (mut all, mut high) = (0u32, 0u32);
    for c in words.chunks_exact(4) {
        // Never the default (the chunk is 4 bytes), and a single load, unlike `[c[0], c[1], ..]`.
        let w = u32::from_le_bytes(c.try_into().unwrap_or_default());
        all = all.wrapping_add(w);
        high = high.wrapping_add(w >> 16);
    }
    u64::from(all.wrapping_sub(high << 16)).wrapping_add(u64::from(high))
}

/// Folds a running sum into the final 16-bit checksum value (complemented).
#[must_use]
#[inline]
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff).wrapping_add(acc >> 16);
    }
    !(acc as u16)
}

/// The checksum of `data` alone, ready to store in a header.
#[must_use]
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    fold(sum(0, data))
}

/// RFC 1624 eqn. 3: the new checksum after one 16-bit word of the covered data changed
/// from `old` to `new`, without summing the data again.
#[must_use]
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    let acc = u32::from(!check).wrapping_add(u32::from(!old)).wrapping_add(u32::from(new));
    fold(acc)
}

/// The sum (unfolded) of the IPv4 pseudo-header (RFC 9293 §3.1, RFC 768): addresses, a
/// zero byte, the protocol and the L4 length, as one 12-byte sum.
#[must_use]
#[inline]
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4_len: u16) -> u32 {
    let mut ph = [0u8; 12];
    let (addrs, rest) = ph.split_at_mut(8);
    let (s, d) = addrs.split_at_mut(4);
    s.copy_from_slice(&src.octets());
    d.copy_from_slice(&dst.octets());
    let [hi, lo] = l4_len.to_be_bytes();
    rest.copy_from_slice(&[0, protocol, hi, lo]);
    sum(0, &ph)
}

/// The sum (unfolded) of the IPv6 pseudo-header (RFC 8200 §8.1): addresses, the 32-bit
/// upper-layer length, three zero bytes and the next header, as one 40-byte sum.
#[must_use]
#[inline]
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: u32) -> u32 {
    let mut ph = [0u8; 40];
    let (addrs, rest) = ph.split_at_mut(32);
    let (s, d) = addrs.split_at_mut(16);
    s.copy_from_slice(&src.octets());
    d.copy_from_slice(&dst.octets());
    let [a, b, c, e] = l4_len.to_be_bytes();
    rest.copy_from_slice(&[a, b, c, e, 0, 0, 0, next_header]);
    sum(0, &ph)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
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

    /// The RFC 1071 loop: big-endian 16-bit words, one at a time, the odd byte padded.
    fn naive_with(acc: u32, data: &[u8]) -> u16 {
        let mut acc = u64::from(acc);
        for (i, b) in data.iter().enumerate() {
            acc += if i % 2 == 0 { u64::from(*b) << 8 } else { u64::from(*b) };
        }
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    fn naive(data: &[u8]) -> u16 {
        naive_with(0, data)
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    const ACCS: [u32; 6] = [0, 1, 0xffff, 0x1_0000, 0xffff_fffe, 0xffff_ffff];

    #[test]
    fn every_short_length_and_offset_matches_the_rfc_1071_loop() {
        let buf = noise(300);
        for offset in 0..8 {
            for len in 0..200 {
                // Odd offsets start the slice at odd addresses.
                let data = &buf[offset..offset + len];
                for acc in ACCS {
                    assert_eq!(fold(sum(acc, data)), naive_with(acc, data), "offset {offset} len {len} acc {acc:#x}");
                }
            }
        }
    }

    #[test]
    fn chained_sums_match_one_sum() {
        let data = noise(3001);
        for acc in ACCS {
            for split in (0..=400).step_by(2).chain([1024, 2048, 2998, 3000]) {
                let chained = sum(sum(acc, &data[..split]), &data[split..]);
                assert_eq!(fold(chained), fold(sum(acc, &data)), "acc {acc:#x} split {split}");
                assert_eq!(fold(chained), naive_with(acc, &data), "acc {acc:#x} split {split}");
            }
        }
    }

    #[test]
    fn large_buffers_do_not_overflow() {
        let data = vec![0xffu8; 70_000];
        assert_eq!(checksum(&data), naive(&data));
        assert_eq!(fold(sum(sum(0xffff_ffff, &data[..40_000]), &data[40_000..])), fold(sum(0xffff_ffff, &data)));
        // All-ones words are the largest: 1 MiB and 8 MiB span several flushes of the 32-bit
        // reductions (lengths around a flush boundary too), at odd addresses as well.
        let ones = vec![0xffu8; (8 << 20) + 1];
        let flush = 4 * FLUSH_WORDS;
        for len in [1 << 20, 8 << 20, flush - 1, flush, flush + 1, flush + 4, 2 * flush + 3] {
            for data in [&ones[..len], &ones[1..=len]] {
                for acc in [0, 0xffff_ffff] {
                    assert_eq!(fold(sum(acc, data)), naive_with(acc, data), "len {len} acc {acc:#x}");
                }
            }
        }
        let data = noise((8 << 20) + 3);
        assert_eq!(checksum(&data), naive(&data));
        assert_eq!(checksum(&data[1..]), naive(&data[1..]));
    }

    proptest::proptest! {
        #[test]
        fn wide_sum_matches_the_rfc_1071_loop(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            proptest::prop_assert_eq!(checksum(&data), naive(&data));
        }

        #[test]
        fn chained_unaligned_sums_match_the_rfc_1071_loop(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            acc in proptest::num::u32::ANY,
            offset in 0usize..8,
            split in 0usize..300,
        ) {
            let data = &data[offset.min(data.len())..];
            let split = (split * 2).min(data.len()) & !1;
            let chained = sum(sum(acc, &data[..split]), &data[split..]);
            proptest::prop_assert_eq!(fold(chained), naive_with(acc, data));
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
