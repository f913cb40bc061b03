//! Importance of a chunk's token groups (ContiguousKV, issue 14): the attention mass each
//! group of each layer received when the prompt that wrote the chunk was prefilled.
//!
//! An engine measures, per layer and per group of `group_tokens` tokens, the share of
//! attention probability the group receives from the last queries of the prompt (its
//! "observation window"), averaged over query heads and those queries. The scores live in the
//! chunk header (format version 2, flag bit 2 `FLAG_IMPORTANCE`, a section after the layer
//! table: docs/FORMAT.md, "Importance"), so a reader learns which groups matter from the
//! header alone, before it reads a byte of payload, and can then load only those groups with a
//! selective load ([`crate::Selection`], [`crate::prefetch`]).
//!
//! Scores of one prompt's chunks are comparable with each other (the same queries spread one
//! unit of mass over the whole prompt), so a pruned reuse ranks groups across all chunks of
//! the prefix ([`top_share`]). This module owns the section's bytes (encode, decode with
//! typed errors) and the ranking helpers; `format.rs` places the section.

use crate::error::FormatError;

/// Bytes before the scores: `u32 observed_queries`, `u32 reserved (0)`.
pub const SECTION_PREFIX: u64 = 8;
/// Upper bound on the section's length, so a hostile header cannot claim gigabytes; shapes
/// whose scores would not fit (millions of groups times thousands of layers) cannot carry
/// importance.
pub const MAX_IMPORTANCE_LEN: u64 = 16 << 20;
/// Slack allowed on a layer's summed mass (float rounding of the writer's sums).
const MASS_SLACK: f32 = 1e-3;

/// Per layer and per group, the attention mass a chunk's groups received.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    num_layers: u32,
    groups: u32,
    observed_queries: u32,
    /// Layer-major: `scores[layer * groups + group]`.
    scores: Vec<f32>,
}

impl Eq for Importance {}

impl Importance {
    /// Scores of `num_layers` layers of `groups` groups, layer-major, measured over the last
    /// `observed_queries` queries. Each score must be finite and in `[0, 1]`, and a layer's
    /// scores may not sum past 1 (they are shares of one unit of attention).
    pub fn new(
        num_layers: u32,
        groups: u32,
        observed_queries: u32,
        scores: Vec<f32>,
    ) -> Result<Importance, FormatError> {
        if num_layers == 0 || groups == 0 {
            return Err(FormatError::field("importance", "no layers or no groups"));
        }
        if observed_queries == 0 {
            return Err(FormatError::field(
                "importance",
                "observed queries must be positive",
            ));
        }
        if scores.len() as u64 != num_layers as u64 * groups as u64 {
            return Err(FormatError::field(
                "importance",
                format!(
                    "{} scores for {num_layers} layers x {groups} groups",
                    scores.len()
                ),
            ));
        }
        if section_len(num_layers, groups) > MAX_IMPORTANCE_LEN {
            return Err(FormatError::field(
                "importance",
                format!("{num_layers} layers x {groups} groups exceed {MAX_IMPORTANCE_LEN} bytes"),
            ));
        }
        for (layer, row) in scores.chunks_exact(groups as usize).enumerate() {
            if let Some(g) = row
                .iter()
                .position(|s| !s.is_finite() || *s < 0.0 || *s > 1.0)
            {
                return Err(FormatError::field(
                    "importance",
                    format!("layer {layer} group {g}: score {} is not in [0, 1]", row[g]),
                ));
            }
            let sum: f32 = row.iter().sum();
            if sum > 1.0 + MASS_SLACK {
                return Err(FormatError::field(
                    "importance",
                    format!("layer {layer}: scores sum to {sum}, more than all attention"),
                ));
            }
        }
        Ok(Importance {
            num_layers,
            groups,
            observed_queries,
            scores,
        })
    }

    pub fn num_layers(&self) -> u32 {
        self.num_layers
    }

    pub fn groups(&self) -> u32 {
        self.groups
    }

    /// How many of the writing prompt's last queries the scores average over.
    pub fn observed_queries(&self) -> u32 {
        self.observed_queries
    }

    /// Scores of one layer, one per group.
    pub fn layer(&self, layer: u32) -> &[f32] {
        let g = self.groups as usize;
        &self.scores[layer as usize * g..(layer as usize + 1) * g]
    }

    /// Length of this section in the header.
    pub fn section_len(&self) -> u64 {
        section_len(self.num_layers, self.groups)
    }

    /// Writes the section into `dst` (exactly [`Importance::section_len`] bytes).
    pub(crate) fn encode(&self, dst: &mut [u8]) {
        dst[..4].copy_from_slice(&self.observed_queries.to_le_bytes());
        dst[4..8].fill(0);
        for (i, s) in self.scores.iter().enumerate() {
            let o = SECTION_PREFIX as usize + 4 * i;
            dst[o..o + 4].copy_from_slice(&s.to_le_bytes());
        }
    }

    /// Reads and checks a section of `num_layers` x `groups` scores.
    pub(crate) fn decode(
        src: &[u8],
        num_layers: u32,
        groups: u32,
    ) -> Result<Importance, FormatError> {
        let len = section_len(num_layers, groups);
        if len > MAX_IMPORTANCE_LEN || (src.len() as u64) < len {
            return Err(FormatError::field(
                "importance",
                format!("section of {len} bytes does not fit the header"),
            ));
        }
        let word = |o: usize| u32::from_le_bytes(src[o..o + 4].try_into().unwrap());
        if word(4) != 0 {
            return Err(FormatError::field(
                "importance",
                "reserved word is not zero",
            ));
        }
        let scores = (0..num_layers as usize * groups as usize)
            .map(|i| f32::from_bits(word(SECTION_PREFIX as usize + 4 * i)))
            .collect();
        Importance::new(num_layers, groups, word(0), scores)
    }

    /// The chunk's share of its prompt's attention: per layer the sum of its groups' scores
    /// (each layer's scores are shares of the one unit of attention the observed queries
    /// spread over the whole prompt), averaged over layers, in `[0, 1]`. The chunk holding the
    /// attention sink (the prompt's first tokens) has the largest share.
    pub fn attention_share(&self) -> f64 {
        let total: f64 = self.scores.iter().map(|&s| s as f64).sum();
        (total / self.num_layers as f64).clamp(0.0, 1.0)
    }

    /// The disk tier's eviction priority this importance implies (0 = evict first; the store
    /// evicts by priority, then recency): [`Importance::attention_share`] in steps of
    /// `1 / PRIORITY_LEVELS`, so `0..=PRIORITY_LEVELS`. Coarse on purpose: chunks of about
    /// the same share are evicted by recency, and an engine's explicit hint above
    /// [`PRIORITY_LEVELS`] outranks every importance.
    pub fn eviction_priority(&self) -> u8 {
        (self.attention_share() * PRIORITY_LEVELS as f64).round() as u8
    }
}

/// Levels of [`Importance::eviction_priority`]: a chunk holding all of its prompt's attention
/// gets this priority, one holding a 32nd of it 1 (rounded), none 0.
pub const PRIORITY_LEVELS: u8 = 16;

/// Bytes of a section with `num_layers` x `groups` scores.
pub fn section_len(num_layers: u32, groups: u32) -> u64 {
    SECTION_PREFIX + 4 * num_layers as u64 * groups as u64
}

/// How many of `groups` a `share` in `(0, 1]` keeps: at least one, rounded up.
pub fn budget_count(groups: usize, share: f64) -> usize {
    ((groups as f64 * share).ceil() as usize).clamp(1.min(groups), groups)
}

/// The indices of the highest `share` of `scores` (ties: the earlier group), sorted.
pub fn top_groups(scores: &[f32], share: f64) -> Vec<u32> {
    top_k(
        scores,
        (0..scores.len() as u32).collect(),
        budget_count(scores.len(), share),
    )
}

/// The `k` of `candidates` (indices into `scores`) with the highest scores, ties to the
/// earlier index, sorted.
fn top_k(scores: &[f32], mut candidates: Vec<u32>, k: usize) -> Vec<u32> {
    candidates.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    candidates.truncate(k);
    candidates.sort_unstable();
    candidates
}

/// Per layer, the highest `share` of groups over a whole prefix: `chunks[c]` is chunk `c`'s
/// importance, and groups are numbered over the prefix chunk by chunk, as
/// [`crate::Selection`] numbers them (`groups_per_chunk` per chunk).
pub fn top_share(chunks: &[&Importance], groups_per_chunk: u32, share: f64) -> Vec<Vec<u32>> {
    let Some(first) = chunks.first() else {
        return Vec::new();
    };
    (0..first.num_layers)
        .map(|layer| {
            let mut scores = Vec::with_capacity(chunks.len() * groups_per_chunk as usize);
            for imp in chunks {
                let row = imp.layer(layer);
                scores.extend_from_slice(row);
                // a short chunk (never stored, but be exact) pads with unselectable groups
                scores.extend(std::iter::repeat_n(
                    -1.0,
                    groups_per_chunk as usize - row.len(),
                ));
            }
            let k = budget_count(chunks.len() * first.groups as usize, share);
            let real = (0..scores.len() as u32).filter(|&g| scores[g as usize] >= 0.0);
            top_k(&scores, real.collect(), k)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_ranking() {
        let imp = Importance::new(2, 4, 32, vec![0.5, 0.1, 0.3, 0.1, 0.0, 0.2, 0.2, 0.6]).unwrap();
        let mut buf = vec![0u8; imp.section_len() as usize];
        imp.encode(&mut buf);
        assert_eq!(Importance::decode(&buf, 2, 4).unwrap(), imp);
        assert_eq!(top_groups(imp.layer(0), 0.5), vec![0, 2]);
        // ties keep the earlier group
        assert_eq!(top_groups(imp.layer(1), 0.5), vec![1, 3]);
        assert_eq!(top_share(&[&imp, &imp], 4, 0.25)[0], vec![0, 4]);
        assert_eq!(budget_count(10, 0.01), 1);
        assert_eq!(budget_count(10, 1.0), 10);
        // layer 0 holds 1.0 of the prompt's attention, layer 1 1.0: all of it, the top level
        assert_eq!(imp.eviction_priority(), PRIORITY_LEVELS);
        let small = Importance::new(2, 2, 8, vec![0.05, 0.05, 0.0, 0.1]).unwrap();
        // a tenth of the attention: 1.6 levels, rounded
        assert!((small.attention_share() - 0.1).abs() < 1e-6);
        assert_eq!(small.eviction_priority(), 2);
    }

    #[test]
    fn bad_scores_are_typed_errors() {
        for scores in [
            vec![f32::NAN, 0.0],
            vec![-0.1, 0.0],
            vec![0.7, 0.7],
            vec![0.5],
        ] {
            assert!(matches!(
                Importance::new(1, 2, 1, scores),
                Err(FormatError::BadField {
                    field: "importance",
                    ..
                })
            ));
        }
        assert!(Importance::new(1, 2, 0, vec![0.0, 0.0]).is_err());
        let imp = Importance::new(1, 2, 1, vec![0.2, 0.3]).unwrap();
        let mut buf = vec![0u8; imp.section_len() as usize];
        imp.encode(&mut buf);
        buf[5] = 1;
        assert!(Importance::decode(&buf, 1, 2).is_err());
        assert!(Importance::decode(&buf[..10], 1, 2).is_err());
    }
}
