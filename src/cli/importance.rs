//! The importance summary `kvfs stat` prints for a chunk whose header carries importance
//! (format v2, issue 14): which groups of each layer hold the top share of the attention the
//! chunk received, how much of it they hold, and the eviction priority that implies.
//!
//! One job: turn a [`kvfs_loader::importance::Importance`] into the figures `stat` shows,
//! as text lines and as JSON.

use kvfs_loader::importance::{Importance, top_groups};

/// The figures of one chunk's importance at a top share.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportanceSummary {
    pub share: f64,
    pub observed_queries: u32,
    pub groups: u32,
    /// Per layer: the top groups (sorted), their summed score, the layer's summed score.
    pub layers: Vec<(Vec<u32>, f32, f32)>,
    /// `Importance::eviction_priority()`: the disk-tier priority the store derives.
    pub priority: u8,
}

pub fn summarize(imp: &Importance, share: f64) -> ImportanceSummary {
    let layers = (0..imp.num_layers())
        .map(|l| {
            let row = imp.layer(l);
            let top = top_groups(row, share);
            let mass = top.iter().map(|&g| row[g as usize]).sum();
            (top, mass, row.iter().sum())
        })
        .collect();
    ImportanceSummary {
        share,
        observed_queries: imp.observed_queries(),
        groups: imp.groups(),
        layers,
        priority: imp.eviction_priority(),
    }
}

impl ImportanceSummary {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "observed_queries": self.observed_queries,
            "groups": self.groups,
            "top_share": self.share,
            "priority": self.priority,
            "layers": self.layers.iter().map(|(top, mass, total)| serde_json::json!({
                "top_groups": top,
                "top_mass": mass,
                "mass": total,
            })).collect::<Vec<_>>(),
        })
    }

    /// Text lines: layer 0 in full, then the other layers' top groups.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "importance:     attention of the prompt's last {} queries; top {:.0}% = {} of {} groups per layer; priority {}",
            self.observed_queries,
            self.share * 100.0,
            self.layers.first().map_or(0, |l| l.0.len()),
            self.groups,
            self.priority
        )];
        for (i, (top, mass, total)) in self.layers.iter().enumerate() {
            let groups: Vec<String> = top.iter().map(u32::to_string).collect();
            out.push(format!(
                "  layer {i:>3}:     groups {} hold {mass:.3} of this chunk's {total:.3}",
                groups.join(",")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_small_chunk() {
        let imp = Importance::new(2, 4, 32, vec![0.5, 0.1, 0.3, 0.1, 0.0, 0.2, 0.2, 0.6]).unwrap();
        let s = summarize(&imp, 0.5);
        assert_eq!(s.layers[0].0, vec![0, 2]);
        assert!((s.layers[0].1 - 0.8).abs() < 1e-6);
        assert_eq!(s.layers[1].0, vec![1, 3]); // ties keep the earlier group
        assert_eq!(s.priority, imp.eviction_priority());
        assert!(
            s.lines()[1].contains("groups 0,2 hold 0.800"),
            "{:?}",
            s.lines()
        );
        assert_eq!(
            s.json()["layers"][1]["top_groups"],
            serde_json::json!([1, 3])
        );
    }
}
