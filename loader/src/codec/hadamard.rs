//! The normalized Walsh-Hadamard transform of one row (a `(token, head)` vector of
//! `head_dim` values), the rotation the `hq4` codec applies before quantizing.
//!
//! `H / sqrt(n)` for the `n x n` Sylvester Hadamard matrix `H` (`n` a power of two) is
//! orthonormal and symmetric, so it is its own inverse: the same function rotates before
//! encoding and back after decoding. A rotation spreads a few large channels (the outlier
//! channels of keys) over every channel of the row, so one scale per row fits all of them
//! (the rotate-then-quantize idea of QuaRot, SpinQuant and QuIP#). In place, `log2(n)`
//! butterfly stages of adds and subtracts, then one multiply per value; no allocation.

/// Rotates `row` in place by the normalized Walsh-Hadamard transform (self-inverse).
/// `row.len()` must be a power of two (the codec checks `head_dim` before it gets here).
#[inline]
pub fn wht_in_place(row: &mut [f32]) {
    let n = row.len();
    debug_assert!(n.is_power_of_two(), "WHT of {n} values");
    let mut h = 1;
    while h < n {
        for block in row.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*x + *y, *x - *y);
                *x = s;
                *y = d;
            }
        }
        h *= 2;
    }
    let norm = 1.0 / (n as f32).sqrt();
    for x in row.iter_mut() {
        *x *= norm;
    }
}
