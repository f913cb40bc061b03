//! Fused CPU loops for the forward pass's element-wise steps (issue 14's engine speed).
//!
//! Candle runs each element-wise op as its own pass that allocates a fresh tensor, and its
//! broadcasting ops walk strided indices: the attention's scale, causal mask, max, subtract,
//! exp, sum and divide made seven passes and five allocations over the `[kv_heads, heads per
//! kv head * n, columns]` scores in every layer (2.4 MB per layer for 32 queries over 2,048
//! positions), plus the mask itself; RoPE made eight small tensors per layer for Q and K alike,
//! RMS norm six. Here each is one loop over a buffer the caller owns.
//!
//! Each loop performs **the same f32 operations in the same order** as the candle chain it
//! replaces (candle's CPU reductions are sequential loops in a build without `avx2` enabled at
//! compile time, which is this workspace's: `x * scale + 0`, the max, `exp(x - max)`, a
//! sequential sum, `x / sum`; RoPE's `x0 * cos - x1 * sin`, `x0 * sin + x1 * cos`; RMS norm's
//! `x / sqrt(sum(x * x) * (1 / d) + 0 + eps) * w`), so the forward pass's outputs, and the KV a
//! prefill stores, are bit for bit what they were (`tests` below compare against candle).
//!
//! Masked positions are never computed: a query's visible columns are a prefix of the
//! (ascending) columns, so [`softmax_causal`] takes each query's visible count and writes
//! exact zeros after it, which is what `exp(-inf - max)` gave.

/// Softmax over each row of `scores` (`rows * width`, row-major) after scaling by `scale`,
/// where row `r` sees its first `visible[r % visible.len()]` columns and the rest are masked
/// (probability 0). Rows are `[.., query]`-major with queries innermost, as the attention
/// lays out `[kv_heads, heads per kv head * n]`, so `visible` has one entry per query.
pub fn softmax_causal(scores: &mut [f32], width: usize, scale: f32, visible: &[usize]) {
    debug_assert_eq!(scores.len() % width.max(1), 0);
    for (r, row) in scores.chunks_exact_mut(width).enumerate() {
        let v = visible[r % visible.len()].min(width);
        let (seen, masked) = row.split_at_mut(v);
        masked.fill(0.0);
        if seen.is_empty() {
            continue;
        }
        let mut max = f32::NEG_INFINITY;
        for x in seen.iter_mut() {
            *x = *x * scale + 0.0;
            max = max.max(*x);
        }
        let mut sum = 0f32;
        for x in seen.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in seen.iter_mut() {
            *x /= sum;
        }
    }
}

/// For queries at ascending `positions` over ascending column positions `cols` (`None`:
/// `0..`), how many columns each query sees (those at or before its position).
pub fn visible_counts(positions: &[usize], cols: Option<&[u32]>, width: usize) -> Vec<usize> {
    positions
        .iter()
        .map(|&p| match cols {
            None => (p + 1).min(width),
            Some(cs) => cs.partition_point(|&c| c as usize <= p),
        })
        .collect()
}

/// Interleaved RoPE in place on `x` (`[n, heads, head_dim]`, row-major) with `cos`/`sin`
/// of `[n, head_dim / 2]`: pair `(x[2i], x[2i+1])` of token `t` turns by angle `(t, i)`.
pub fn rope_interleaved(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (t, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in token.chunks_exact_mut(head_dim) {
            for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c[i] - x1 * s[i];
                pair[1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

/// RMS norm of each row of `x` (`[n, w.len()]`) into a new buffer, scaled by `w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let inv = (1f64 / d as f64) as f32;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mut ss = 0f32;
        for &v in row {
            ss += v * v;
        }
        let den = (((ss * inv + 0.0) * 1.0) + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| v / den * g));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Tensor};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // deterministic values in about [-4, 4)
        (0..n as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
                (h % 8000) as f32 / 1000.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn softmax_matches_candle_bit_for_bit() {
        let (rows, width, n) = (12, 37, 4);
        let s = data(rows * width, 7);
        let positions = [30usize, 31, 33, 36];
        let scale = 0.125f32;
        // candle's chain with a -inf mask, as the forward pass had it
        let mask: Vec<f32> = positions
            .iter()
            .flat_map(|&p| (0..width).map(move |j| if j <= p { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let t = Tensor::from_vec(s.clone(), (rows / n, n, width), &Device::Cpu).unwrap();
        let m = Tensor::from_vec(mask, (n, width), &Device::Cpu).unwrap();
        let x = (t * scale as f64).unwrap().broadcast_add(&m).unwrap();
        let mx = x.max_keepdim(D::Minus1).unwrap();
        let e = x.broadcast_sub(&mx).unwrap().exp().unwrap();
        let want = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();

        let mut got = s;
        softmax_causal(
            &mut got,
            width,
            scale,
            &visible_counts(&positions, None, width),
        );
        assert_eq!(got, want);
        assert_eq!(
            got[3 * width - 1],
            0.0,
            "query at 33 sees nothing past column 33"
        );
        assert!(got[4 * width - 1] > 0.0, "query at 36 sees column 36");
    }

    #[test]
    fn visible_counts_follow_the_columns() {
        assert_eq!(visible_counts(&[3, 9], None, 8), vec![4, 8]);
        let cols = [0u32, 5, 7, 8, 9];
        assert_eq!(visible_counts(&[7, 8, 9], Some(&cols), 5), vec![3, 4, 5]);
    }

    #[test]
    fn rms_norm_matches_candle_bit_for_bit() {
        let (n, d) = (3, 40);
        let x = data(n * d, 3);
        let w = data(d, 9);
        let eps = 1e-5f64;
        let xt = Tensor::from_vec(x.clone(), (n, d), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), d, &Device::Cpu).unwrap();
        let ms = xt.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let want = xt
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&wt)
            .unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rms_norm(&x, &w, eps as f32), want);
    }

    #[test]
    fn rope_matches_candle_bit_for_bit() {
        let (n, h, d) = (3, 2, 8);
        let x = data(n * h * d, 5);
        let cos = data(n * d / 2, 11);
        let sin = data(n * d / 2, 13);
        // the candle chain the forward pass had: pairs split, turned, put back side by side
        let dev = Device::Cpu;
        let xt = Tensor::from_vec(x.clone(), (n, h, d / 2, 2), &dev).unwrap();
        let c = Tensor::from_vec(cos.clone(), (n, 1, d / 2, 1), &dev).unwrap();
        let s = Tensor::from_vec(sin.clone(), (n, 1, d / 2, 1), &dev).unwrap();
        let (x0, x1) = (xt.narrow(3, 0, 1).unwrap(), xt.narrow(3, 1, 1).unwrap());
        let r0 = (x0.broadcast_mul(&c).unwrap() - x1.broadcast_mul(&s).unwrap()).unwrap();
        let r1 = (x0.broadcast_mul(&s).unwrap() + x1.broadcast_mul(&c).unwrap()).unwrap();
        let want = Tensor::cat(&[r0, r1], 3).unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let mut got = x;
        rope_interleaved(&mut got, h, d, &cos, &sin);
        assert_eq!(got, want);
    }

    #[test]
    fn rope_turns_pairs() {
        // a quarter turn maps (1, 0) to (0, 1) and (0, 1) to (-1, 0)
        let mut x = vec![1.0, 0.0, 0.0, 1.0];
        rope_interleaved(&mut x, 1, 4, &[0.0, 0.0], &[1.0, 1.0]);
        assert_eq!(x, vec![0.0, 1.0, -1.0, 0.0]);
    }
}
