use super::*;

fn shape(dtype: Dtype, plane: u32, tokens: usize) -> GroupShape {
    GroupShape {
        dtype,
        plane,
        keys_per_channel: true,
        tokens,
        heads: 3,
        head_dim: 64,
    }
}

/// KV-like values: a smooth per-channel offset (outlier channels) plus noise.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            let ch = i % 192;
            let outlier = if ch % 37 == 0 { 12.0 } else { 0.0 };
            outlier + noise * 3.0
        })
        .collect()
}

fn raw_of(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * dtype.size()];
    from_f32(dtype, v, &mut out);
    out
}

fn roundtrip(codec: Codec, s: &GroupShape, raw: &[u8]) -> (Vec<u8>, usize) {
    let mut coder = Coder::new();
    let mut stored = Vec::new();
    coder.encode(codec, s, raw, &mut stored).unwrap();
    let mut out = vec![0u8; raw.len()];
    coder.decode(codec, s, &stored, &mut out).unwrap();
    (out, stored.len())
}

#[test]
fn lossless_is_bit_exact_for_every_dtype_and_odd_values() {
    for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        for tokens in [16, 5, 1] {
            let s = shape(dtype, 1, tokens);
            let mut v = values(s.elements(), 7);
            v[0] = f32::NAN;
            v[1] = f32::INFINITY;
            v[2] = -0.0;
            v[3] = 1e-40;
            v[4] = f32::NEG_INFINITY;
            let raw = raw_of(dtype, &v);
            let (out, stored) = roundtrip(Codec::Lossless, &s, &raw);
            assert_eq!(out, raw, "{dtype} {tokens}");
            if tokens == 16 {
                assert!(stored < raw.len(), "{dtype}: {stored} >= {}", raw.len());
            }
        }
    }
    // fp8 KV and incompressible bytes: stored as they are, still exact.
    let s = shape(Dtype::Fp8E4m3, 0, 16);
    let raw: Vec<u8> = (0..s.raw_len()).map(|i| (i * 7919 % 251) as u8).collect();
    assert_eq!(roundtrip(Codec::Lossless, &s, &raw).0, raw);
}

#[test]
fn e4m3_roundtrips_every_finite_byte() {
    for b in 0..=255u8 {
        if b & 0x7F == 0x7F {
            assert!(fp8::e4m3_to_f32(b).is_nan());
            continue;
        }
        let v = fp8::e4m3_to_f32(b);
        let back = fp8::f32_to_e4m3(v);
        // +0 and -0 are distinct bytes and round-trip as such.
        assert_eq!(back, b, "byte {b:#04x} = {v}");
    }
    assert_eq!(fp8::e4m3_to_f32(0x7E), 448.0);
    assert_eq!(fp8::f32_to_e4m3(1e9), 0x7E);
    assert_eq!(fp8::f32_to_e4m3(-1e9), 0xFE);
    // Ties go to even: 1 + 1/16 lies between 1 and 1.125.
    assert_eq!(fp8::f32_to_e4m3(1.0625), fp8::f32_to_e4m3(1.0));
}

/// Largest error of the decoded values relative to each row's largest magnitude.
fn worst_relative_error(codec: Codec, s: &GroupShape) -> f32 {
    let v = values(s.elements(), 11);
    let raw = raw_of(Dtype::F32, &v);
    let (out, stored) = roundtrip(codec, s, &raw);
    assert_eq!(Some(stored), codec.fixed_len(s));
    let mut back = Vec::new();
    to_f32(Dtype::F32, &out, &mut back);
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    v.iter()
        .zip(&back)
        .map(|(a, b)| (a - b).abs() / amax)
        .fold(0.0, f32::max)
}

#[test]
fn lossy_codecs_stay_within_their_step() {
    for plane in [0, 1] {
        let s = shape(Dtype::F32, plane, 16);
        // e4m3: 3 mantissa bits, half a step is 1/16 relative.
        assert!(worst_relative_error(Codec::Fp8, &s) <= 1.0 / 16.0);
        // Integer codes: half a step of the range (~2 * amax at most).
        assert!(worst_relative_error(Codec::Kivi4, &s) <= 2.0 / 15.0 / 2.0 * 1.01);
        assert!(worst_relative_error(Codec::Kivi2, &s) <= 2.0 / 3.0 / 2.0 * 1.01);
        // int8: half a step of 1/127 of the row's largest value (the scale byte rounds up by
        // at most 1/8 of itself).
        assert!(worst_relative_error(Codec::Int8, &s) <= 1.0 / 127.0 / 2.0 * 1.125);
    }
}

#[test]
fn lossy_codecs_are_smaller_by_their_nominal_ratio() {
    let s = shape(Dtype::Bf16, 1, 16);
    let raw = s.raw_len() as f64;
    let ratio = |c: Codec| raw / c.fixed_len(&s).unwrap() as f64;
    assert!(ratio(Codec::Fp8) > 1.96);
    // One byte per element plus a scale byte per 64, as fp8.
    assert!(ratio(Codec::Int8) > 1.96);
    assert!(ratio(Codec::Kivi4) > 3.5);
    assert!(ratio(Codec::Kivi2) > 6.0);
    // 4 bits per element plus a scale byte per 64: 3.88x.
    assert!(ratio(Codec::Hq4) > 3.87);
}

#[test]
fn lossy_codecs_refuse_fp8_kv() {
    let s = shape(Dtype::Fp8E4m3, 0, 16);
    let raw = vec![0u8; s.raw_len()];
    let err = Coder::new()
        .encode(Codec::Kivi4, &s, &raw, &mut Vec::new())
        .unwrap_err();
    assert!(matches!(
        err,
        CodecError::Unsupported {
            codec: Codec::Kivi4,
            ..
        }
    ));
}

#[test]
fn corrupt_groups_are_typed_errors() {
    let s = shape(Dtype::Bf16, 0, 16);
    let raw = raw_of(Dtype::Bf16, &values(s.elements(), 3));
    let mut coder = Coder::new();
    let mut stored = Vec::new();
    coder
        .encode(Codec::Lossless, &s, &raw, &mut stored)
        .unwrap();
    let mut out = vec![0u8; raw.len()];
    // Truncated.
    let err = coder
        .decode(Codec::Lossless, &s, &stored[..stored.len() - 3], &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Corrupt {
                codec: Codec::Lossless,
                ..
            }
        ),
        "{err}"
    );
    // Trailing bytes.
    let mut long = stored.clone();
    long.push(0);
    let err = coder
        .decode(Codec::Lossless, &s, &long, &mut out)
        .unwrap_err();
    assert!(matches!(err, CodecError::Corrupt { .. }), "{err}");
    // Decoded to another size: the same stream decoded with a shorter shape.
    let short = shape(Dtype::Bf16, 0, 8);
    let mut out_short = vec![0u8; short.raw_len()];
    let err = coder
        .decode(Codec::Lossless, &short, &stored, &mut out_short)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::DecodedSize { .. } | CodecError::Corrupt { .. }
        ),
        "{err}"
    );
    // A fixed-size codec given the wrong number of bytes.
    for codec in [Codec::Fp8, Codec::Int8, Codec::Hq4] {
        let err = coder.decode(codec, &s, &stored, &mut out).unwrap_err();
        assert!(
            matches!(err, CodecError::Corrupt { codec: c, .. } if c == codec),
            "{err}"
        );
    }
    // A destination of the wrong size.
    let err = coder
        .decode(Codec::Raw, &s, &raw, &mut out[..10])
        .unwrap_err();
    assert!(matches!(err, CodecError::DecodedSize { .. }), "{err}");
}

#[test]
fn names_parse_and_unknown_names_are_errors() {
    for c in Codec::ALL {
        assert_eq!(Codec::parse(c.name()).unwrap(), c);
        assert_eq!(Codec::from_u8(c as u8), Some(c));
    }
    let err = Codec::parse("gzip").unwrap_err();
    assert!(matches!(&err, CodecError::UnknownName(n) if n == "gzip"));
    // The message lists every codec this build knows.
    for c in Codec::ALL {
        assert!(err.to_string().contains(c.name()), "{err}");
    }
    assert_eq!(Codec::parse("INT8").unwrap(), Codec::Int8);
    assert_eq!(Codec::from_u8(200), None);
}

/// The SSSE3 exponent decoder and the scalar one give the same exponents, escapes included,
/// for every length (whole 32-element steps and tails), and the same errors.
#[test]
fn lossless_exponent_decoders_agree() {
    let table: [u8; 16] = std::array::from_fn(|i| if i < 7 { 100 + 3 * i as u8 } else { 0 });
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for n in [0, 1, 31, 32, 33, 64, 95, 3072, 3073] {
        let idx: Vec<u8> = (0..n)
            .map(|_| {
                let r = next();
                // About one in eight indices is the escape.
                if r % 8 == 0 { 7 } else { (r >> 8) as u8 % 7 }
            })
            .collect();
        let planes: Vec<u8> = (0..3)
            .flat_map(|b| {
                idx.chunks(8)
                    .map(move |e| {
                        e.iter()
                            .enumerate()
                            .fold(0u8, |a, (k, i)| a | ((i >> b) & 1) << k)
                    })
                    .collect::<Vec<u8>>()
            })
            .collect();
        let escapes: Vec<u8> = (0..idx.iter().filter(|&&i| i == 7).count())
            .map(|k| k as u8)
            .collect();
        let want: Vec<u8> = {
            let mut k = 0;
            idx.iter()
                .map(|&i| {
                    if i == 7 {
                        k += 1;
                        (k - 1) as u8
                    } else {
                        table[i as usize]
                    }
                })
                .collect()
        };
        let [scalar, fast] = lossless::testing::exponents_both_ways(&planes, &table, &escapes, n);
        assert_eq!(scalar.as_ref().unwrap(), &want, "scalar, {n} elements");
        assert_eq!(fast.as_ref().unwrap(), &want, "fast, {n} elements");
        if !escapes.is_empty() {
            // One escape short, one too many: both decoders refuse, with the same error.
            for esc in [&escapes[1..], &[escapes.as_slice(), &[0]].concat()[..]] {
                let [scalar, fast] =
                    lossless::testing::exponents_both_ways(&planes, &table, esc, n);
                assert!(scalar.is_err(), "{n} elements, {} escapes", esc.len());
                assert_eq!(scalar, fast, "{n} elements, {} escapes", esc.len());
            }
        }
    }
}

/// Damaged lossless groups are typed errors naming the codec, never wrong bytes in `out`:
/// an unknown mode, an escape count that does not match the indices, a coded group of fp8
/// KV, a stray bit in the unused last index, an empty group.
#[test]
fn lossless_damaged_headers_are_typed_errors() {
    let s = shape(Dtype::Bf16, 1, 16);
    let mut v = values(s.elements(), 5);
    // Twenty distinct exponents: some escape (the table holds 7).
    for (i, x) in v.iter_mut().take(20).enumerate() {
        *x = 2f32.powi(i as i32 - 10);
    }
    let raw = raw_of(Dtype::Bf16, &v);
    let mut coder = Coder::new();
    let mut stored = Vec::new();
    coder
        .encode(Codec::Lossless, &s, &raw, &mut stored)
        .unwrap();
    assert_eq!(stored[0], 1, "coded, not stored raw");
    let escaped = u32::from_le_bytes(stored[8..12].try_into().unwrap());
    assert!(escaped > 0, "the test needs escapes");
    let mut out = vec![0u8; raw.len()];
    coder
        .decode(Codec::Lossless, &s, &stored, &mut out)
        .unwrap();
    assert_eq!(out, raw);
    let is_corrupt = |r: Result<(), CodecError>| {
        matches!(
            r,
            Err(CodecError::Corrupt {
                codec: Codec::Lossless,
                ..
            })
        )
    };
    let mut bad = stored.clone();
    bad[0] = 7;
    assert!(is_corrupt(coder.decode(
        Codec::Lossless,
        &s,
        &bad,
        &mut out
    )));
    // One escape fewer in the count, and the last stored byte dropped to keep the length.
    let mut bad = stored.clone();
    bad[8..12].copy_from_slice(&(escaped - 1).to_le_bytes());
    bad.pop();
    assert!(is_corrupt(coder.decode(
        Codec::Lossless,
        &s,
        &bad,
        &mut out
    )));
    // The index of an element that was not escaped turned into an escape: more escapes
    // used than stored.
    let plane = s.elements() / 8;
    let index = |i: usize| {
        (0..3).fold(0, |a, b| {
            a | ((stored[12 + b * plane + i / 8] >> (i % 8)) & 1) << b
        })
    };
    let first = (0..s.elements()).find(|&i| index(i) != 7).unwrap();
    let mut bad = stored.clone();
    for b in 0..3 {
        bad[12 + b * plane + first / 8] |= 1 << (first % 8);
    }
    assert!(is_corrupt(coder.decode(
        Codec::Lossless,
        &s,
        &bad,
        &mut out
    )));
    let fp8 = shape(Dtype::Fp8E4m3, 1, 16);
    let mut fp8_out = vec![0u8; fp8.raw_len()];
    let mut coded = stored[..12].to_vec();
    coded.resize(12 + 3 * fp8.elements().div_ceil(8), 0);
    assert!(is_corrupt(coder.decode(
        Codec::Lossless,
        &fp8,
        &coded,
        &mut fp8_out
    )));
    // An element count that leaves unused bits in the index planes, one of them set. The
    // group, by hand: bf16 1.0, 2.0, 3.0 are exponents 127, 128, 128 (table 127, 128;
    // indices 0, 1, 1: planes 0b110, 0, 0) and rests 0, 0, 0x40 (3.0 = 1.5 * 2).
    let odd = GroupShape {
        heads: 1,
        head_dim: 3,
        tokens: 1,
        ..s
    };
    let mut odd_stored = vec![1u8, 127, 128];
    odd_stored.resize(12, 0);
    odd_stored.extend_from_slice(&[0b110, 0, 0, 0, 0, 0x40]);
    let mut o = vec![0u8; 6];
    coder
        .decode(Codec::Lossless, &odd, &odd_stored, &mut o)
        .unwrap();
    assert_eq!(o, raw_of(Dtype::Bf16, &[1.0, 2.0, 3.0]));
    odd_stored[13] |= 0x10;
    assert!(is_corrupt(coder.decode(
        Codec::Lossless,
        &odd,
        &odd_stored,
        &mut o
    )));
    assert!(is_corrupt(coder.decode(Codec::Lossless, &s, &[], &mut out)));
}

/// bf16 KV with few distinct exponents is stored at 11-12 of 16 bits per element.
#[test]
fn lossless_bf16_ratio_is_at_least_1_3() {
    let s = shape(Dtype::Bf16, 1, 16);
    let raw = raw_of(Dtype::Bf16, &values(s.elements(), 9));
    let (out, stored) = roundtrip(Codec::Lossless, &s, &raw);
    assert_eq!(out, raw);
    let ratio = raw.len() as f64 / stored as f64;
    assert!(ratio > 1.3, "{ratio}");
}

/// The stored scale of each (token, head) row of an int8 group.
fn int8_scales(s: &GroupShape, stored: &[u8]) -> Vec<f32> {
    stored[..s.tokens * s.heads]
        .iter()
        .map(|&b| int8::scale_value(b))
        .collect()
}

/// The scale byte: every byte's value is `2^(e - 20) * (1 + m / 8)` (0 for byte 0), values
/// grow with the byte, and the encoder picks the smallest one at least what a row needs.
#[test]
fn int8_scale_byte_is_the_smallest_covering_scale() {
    assert_eq!(int8::scale_value(0), 0.0);
    assert_eq!(int8::scale_value(20 << 3), 1.0);
    assert_eq!(int8::scale_value((20 << 3) | 4), 1.5);
    assert_eq!(int8::scale_value(255), 2f32.powi(11) * 1.875);
    for b in 1..=255u8 {
        assert!(int8::scale_value(b) > int8::scale_value(b - 1), "byte {b}");
    }
    let mut wants = vec![
        0.0,
        1e-30,
        1e-7,
        2f32.powi(-20),
        1.0,
        1.0625,
        1.125,
        3839.0,
        3840.0,
    ];
    wants.extend((0..2000).map(|i| 1e-6 * 1.013f32.powi(i)));
    for want in wants {
        let smallest = (0..=255u8).find(|&b| int8::scale_value(b) >= want);
        assert_eq!(int8::scale_byte_at_least(want), smallest, "{want}");
    }
    assert_eq!(int8::scale_byte_at_least(3840.5), None);
}

/// Every int8 element decodes within half its row's scale of its value (plus the output
/// dtype's own rounding), and odd rows (all zero, tiny, one large outlier, a row of f16 KV at
/// the top of its range) round-trip too.
#[test]
fn int8_decodes_within_half_a_scale_step() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        for tokens in [16, 5, 1] {
            let s = shape(dtype, 0, tokens);
            let mut v = values(s.elements(), 13);
            v[..64].fill(0.0); // row 0: all zero
            for (i, x) in v[64..128].iter_mut().enumerate() {
                *x = (i as f32 - 30.0) * 1e-7; // row 1: below f16's normal range
            }
            v[130] = 3000.0; // row 2: one outlier
            if dtype == Dtype::F16 && tokens > 1 {
                v[192] = 65504.0; // row 3: f16's largest value
                v[193] = -65504.0;
            }
            // The input as the dtype holds it.
            let raw = raw_of(dtype, &v);
            let mut x = Vec::new();
            to_f32(dtype, &raw, &mut x);
            let mut coder = Coder::new();
            let mut stored = Vec::new();
            coder.encode(Codec::Int8, &s, &raw, &mut stored).unwrap();
            assert_eq!(Some(stored.len()), Codec::Int8.fixed_len(&s));
            let mut out = vec![0u8; raw.len()];
            coder.decode(Codec::Int8, &s, &stored, &mut out).unwrap();
            let mut y = Vec::new();
            to_f32(dtype, &out, &mut y);
            let scales = int8_scales(&s, &stored);
            for (r, ((xr, yr), &scale)) in x
                .chunks_exact(64)
                .zip(y.chunks_exact(64))
                .zip(&scales)
                .enumerate()
            {
                let amax = xr.iter().fold(0f32, |m, a| m.max(a.abs()));
                assert!(scale >= amax / 127.0, "{dtype} row {r}: scale {scale}");
                assert_eq!(scale == 0.0, amax == 0.0, "{dtype} row {r}");
                for (k, (a, b)) in xr.iter().zip(yr).enumerate() {
                    assert!(b.is_finite(), "{dtype} row {r} elem {k}: {b}");
                    // The dtype's own rounding of the decoded value: half an ulp of it.
                    let ulp = match dtype {
                        Dtype::F32 => 0.0,
                        Dtype::Bf16 => b.abs() / 256.0,
                        _ => (b.abs() / 2048.0).max(2f32.powi(-25)),
                    };
                    let tol = scale / 2.0 * (1.0 + 1e-6) + ulp;
                    assert!(
                        (a - b).abs() <= tol,
                        "{dtype} {tokens} row {r} elem {k}: {a} -> {b} (scale {scale})"
                    );
                }
            }
        }
    }
}

/// Decoding into bf16 and f16 gives what converting the f32 decode gives (round to nearest
/// even), for every code and a spread of scales: the vectorized narrowing is exact.
#[test]
fn int8_narrow_decodes_match_the_f32_decode() {
    let s = GroupShape {
        dtype: Dtype::F32,
        plane: 1,
        keys_per_channel: true,
        tokens: 2,
        heads: 1,
        head_dim: 256,
    };
    for scale in [1u8, 7, 8, 0x55, 20 << 3, 0xA3, 0xF0, 255] {
        let mut stored = vec![scale; s.tokens];
        for t in 0..s.tokens {
            stored.extend((0..=255u8).map(|q| q.wrapping_add(t as u8 * 3)));
        }
        let mut wide = vec![0u8; s.raw_len()];
        let mut coder = Coder::new();
        coder.decode(Codec::Int8, &s, &stored, &mut wide).unwrap();
        let mut v = Vec::new();
        to_f32(Dtype::F32, &wide, &mut v);
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let narrow_shape = GroupShape { dtype, ..s };
            let mut narrow = vec![0u8; narrow_shape.raw_len()];
            coder
                .decode(Codec::Int8, &narrow_shape, &stored, &mut narrow)
                .unwrap();
            let clamped: Vec<f32> = v.iter().map(|x| x.clamp(-65504.0, 65504.0)).collect();
            let want = raw_of(dtype, if dtype == Dtype::F16 { &clamped } else { &v });
            assert_eq!(narrow, want, "{dtype} scale byte {scale:#04x}");
        }
    }
}

/// NaN and infinite KV are a typed error naming the codec and the element, for every lossy
/// codec, and leave the output as it was; int8 also refuses a row no f16 scale covers.
#[test]
fn lossy_codecs_refuse_non_finite_kv() {
    let s = shape(Dtype::F32, 1, 16);
    for codec in Codec::ALL.into_iter().filter(|c| !c.is_lossless()) {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = values(s.elements(), 3);
            v[100] = bad;
            let raw = raw_of(Dtype::F32, &v);
            let mut out = vec![7u8; 3];
            let err = Coder::new().encode(codec, &s, &raw, &mut out).unwrap_err();
            assert!(
                matches!(err, CodecError::OutOfRange { codec: c, index: 100, .. } if c == codec),
                "{codec} {bad}: {err}"
            );
            assert!(err.to_string().contains(codec.name()), "{err}");
            assert_eq!(out, [7, 7, 7], "{codec}: nothing appended");
        }
    }
    let mut v = values(s.elements(), 3);
    v[64 * 5 + 2] = 1e7;
    let mut out = vec![7u8; 3];
    let err = Coder::new()
        .encode(Codec::Int8, &s, &raw_of(Dtype::F32, &v), &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::OutOfRange {
                codec: Codec::Int8,
                index: 320,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(out, [7, 7, 7]);
}

/// The run-time-picked int8 decoder (AVX2 where the CPU has it) and the baseline build of
/// the same loops give the same bytes, for every dtype.
#[test]
fn int8_decoders_agree() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let s = shape(dtype, 1, 13);
        let raw = raw_of(dtype, &values(s.elements(), 21));
        let mut stored = Vec::new();
        Coder::new()
            .encode(Codec::Int8, &s, &raw, &mut stored)
            .unwrap();
        let (mut picked, mut baseline) = (vec![0u8; raw.len()], vec![1u8; raw.len()]);
        int8::decode(&s, &stored, &mut picked);
        int8::decode_rows(&s, &stored, &mut baseline);
        assert_eq!(picked, baseline, "{dtype}");
    }
}

/// Synthetic random bits lose exactly their NaN and infinite elements before a lossy codec.
#[test]
fn zero_non_finite_zeroes_only_non_finite_elements() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let v = [
            1.5,
            f32::NAN,
            -0.0,
            f32::INFINITY,
            -3.0,
            f32::NEG_INFINITY,
            1e-30,
        ];
        let mut raw = raw_of(dtype, &v);
        let before = raw.clone();
        zero_non_finite(dtype, &mut raw);
        let mut back = Vec::new();
        to_f32(dtype, &raw, &mut back);
        let n = dtype.size();
        for (i, x) in v.iter().enumerate() {
            let e = &raw[i * n..(i + 1) * n];
            if x.is_finite() {
                assert_eq!(e, &before[i * n..(i + 1) * n], "{dtype} {x}");
            } else {
                assert!(e.iter().all(|&b| b == 0), "{dtype} {x}");
            }
        }
        assert!(back.iter().all(|x| x.is_finite()));
    }
}

/// The normalized Walsh-Hadamard transform is orthonormal and its own inverse, and spreads
/// one large channel evenly over the whole row (why hq4 rotates before quantizing).
#[test]
fn hadamard_is_an_orthonormal_involution_that_spreads_outliers() {
    for n in [1usize, 2, 8, 64, 128] {
        let x = values(n, 5);
        let mut y = x.clone();
        hadamard::wht_in_place(&mut y);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        assert!(
            (norm(&x) - norm(&y)).abs() <= 1e-5 * norm(&x),
            "{n}: norm kept"
        );
        hadamard::wht_in_place(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{n}: {a} -> {b}");
        }
    }
    let mut one_hot = [0f32; 64];
    one_hot[37] = 8.0;
    hadamard::wht_in_place(&mut one_hot);
    assert!(one_hot.iter().all(|v| v.abs() == 1.0), "{one_hot:?}");
}

/// The rotated row of `x` (what hq4 quantizes).
fn rotated(x: &[f32]) -> Vec<f32> {
    let mut r = x.to_vec();
    hadamard::wht_in_place(&mut r);
    r
}

/// Every hq4 row decodes within half a scale step per rotated element: the rotation is
/// orthonormal, so the row's error norm is at most `sqrt(head_dim) * scale / 2` (plus the
/// output dtype's rounding); the scale is the smallest scale byte covering the rotated row's
/// `absmax / 7`; odd rows (all zero, tiny, one large outlier) round-trip too.
#[test]
fn hq4_decodes_within_half_a_scale_step_per_rotated_element() {
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        for (plane, tokens) in [(0, 16), (1, 5), (0, 1)] {
            let s = shape(dtype, plane, tokens);
            let mut v = values(s.elements(), 17);
            v[..64].fill(0.0); // row 0: all zero
            for (i, x) in v[64..128].iter_mut().enumerate() {
                *x = (i as f32 - 30.0) * 1e-7; // row 1: tiny
            }
            v[130] = 3000.0; // row 2: one outlier
            if tokens > 1 {
                // Row 3: f16's largest value, which the code's error passes (this row's
                // element 0 decodes to 66560 in f32; into f16 decoding saturates at 65504
                // rather than give an infinity).
                v[192..256].fill(0.0);
                v[192] = 65504.0;
                v[193] = -3000.0;
            }
            let raw = raw_of(dtype, &v);
            let mut x = Vec::new();
            to_f32(dtype, &raw, &mut x);
            let mut coder = Coder::new();
            let mut stored = Vec::new();
            coder.encode(Codec::Hq4, &s, &raw, &mut stored).unwrap();
            assert_eq!(Some(stored.len()), Codec::Hq4.fixed_len(&s));
            let mut out = vec![0u8; raw.len()];
            coder.decode(Codec::Hq4, &s, &stored, &mut out).unwrap();
            let mut y = Vec::new();
            to_f32(dtype, &out, &mut y);
            for (r, (xr, yr)) in x.chunks_exact(64).zip(y.chunks_exact(64)).enumerate() {
                let scale = int8::scale_value(stored[r]);
                let amax = rotated(xr).iter().fold(0f32, |m, a| m.max(a.abs()));
                assert_eq!(
                    Some(stored[r]),
                    int8::scale_byte_at_least(amax / 7.0),
                    "{dtype} row {r}"
                );
                let err = xr
                    .iter()
                    .zip(yr)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(yr.iter().all(|b| b.is_finite()), "{dtype} row {r}: {yr:?}");
                let ymax = yr.iter().fold(0f32, |m, b| m.max(b.abs()));
                let ulp = match dtype {
                    Dtype::F32 => 0.0,
                    Dtype::Bf16 => ymax / 256.0,
                    _ => (ymax / 2048.0).max(2f32.powi(-25)),
                };
                let bound = 8.0 * (scale / 2.0 * (1.0 + 1e-5) + ulp) + amax * 1e-6;
                assert!(err <= bound, "{dtype} row {r}: error {err} > {bound}");
            }
        }
    }
}

/// hq4 stores a row of 64 in 33 bytes (3.88x of bf16), refuses a row no scale byte covers,
/// and refuses rows that are not a power of two long (its rotation's size), when encoding
/// and when decoding, with a typed error naming the codec.
#[test]
fn hq4_ratio_range_and_head_dim() {
    let s = shape(Dtype::Bf16, 0, 16);
    let ratio = s.raw_len() as f64 / Codec::Hq4.fixed_len(&s).unwrap() as f64;
    assert!(ratio > 3.87, "{ratio}");
    let s = shape(Dtype::F32, 1, 16);
    let mut v = values(s.elements(), 3);
    v[64 * 5 + 2] = 1e6;
    let mut out = vec![7u8; 3];
    let err = Coder::new()
        .encode(Codec::Hq4, &s, &raw_of(Dtype::F32, &v), &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::OutOfRange {
                codec: Codec::Hq4,
                index: 320,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(out, [7, 7, 7]);
    let odd = GroupShape {
        head_dim: 48,
        ..shape(Dtype::F32, 0, 16)
    };
    let raw = raw_of(Dtype::F32, &values(odd.elements(), 3));
    let mut out = vec![7u8; 3];
    let err = Coder::new()
        .encode(Codec::Hq4, &odd, &raw, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::HeadDim {
                codec: Codec::Hq4,
                head_dim: 48
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("hq4"), "{err}");
    assert_eq!(out, [7, 7, 7]);
    let mut dst = vec![0u8; odd.raw_len()];
    let err = Coder::new()
        .decode(Codec::Hq4, &odd, &vec![0u8; 16 * 3 * 24 + 48], &mut dst)
        .unwrap_err();
    assert!(matches!(err, CodecError::HeadDim { .. }), "{err}");
    // The other codecs take any row length.
    assert!(
        Codec::ALL
            .into_iter()
            .all(|c| c == Codec::Hq4 || c.supports_head_dim(48))
    );
}

/// Decoding hq4 into bf16 and f16 gives what converting its f32 decode gives (round to
/// nearest even; f16 saturated at its largest value): the direct narrowing is exact.
#[test]
fn hq4_narrow_decodes_match_the_f32_decode() {
    let s = shape(Dtype::F32, 0, 16);
    let mut v = values(s.elements(), 29);
    v[64..128].fill(0.0);
    v[64] = 65504.0;
    v[65] = -3000.0;
    let mut stored = Vec::new();
    let mut coder = Coder::new();
    coder
        .encode(Codec::Hq4, &s, &raw_of(Dtype::F32, &v), &mut stored)
        .unwrap();
    let mut wide = vec![0u8; s.raw_len()];
    coder.decode(Codec::Hq4, &s, &stored, &mut wide).unwrap();
    let mut y = Vec::new();
    to_f32(Dtype::F32, &wide, &mut y);
    assert!(
        y[64] > 65504.0,
        "the test row passes f16's range in f32: {}",
        y[64]
    );
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let narrow_shape = GroupShape { dtype, ..s };
        let mut narrow = vec![0u8; narrow_shape.raw_len()];
        coder
            .decode(Codec::Hq4, &narrow_shape, &stored, &mut narrow)
            .unwrap();
        let clamped: Vec<f32> = y.iter().map(|x| x.clamp(-65504.0, 65504.0)).collect();
        let want = raw_of(dtype, if dtype == Dtype::F16 { &clamped } else { &y });
        assert_eq!(narrow, want, "{dtype}");
    }
}
