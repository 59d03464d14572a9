//! Resilient Change Tracking of one simulated virtual disk: a log of guest writes stamped with
//! the tracking generation they happened in, and the RCT ids checkpoints get.
//!
//! A checkpoint taken in generation `g` gets the id `rctX:<epoch>:<g>` and opens generation
//! `g + 1`; the changes between an older id `p` and that checkpoint are the writes of
//! generations `p + 1 ..= g`. Breaking RCT (what a storage migration, a configuration version
//! below 6.2 or a crash of the tracking does on a real host) starts a new epoch: every id handed
//! out before is unknown from then on, as Windows answers for an invalid tracking id.

/// Granularity of the change log, as RCT tracks whole blocks rather than sectors.
pub const RCT_BLOCK: u64 = 64 << 10;

/// The change log of one disk.
#[derive(Debug, Clone)]
pub struct Rct {
    epoch: String,
    generation: u64,
    /// (generation, offset, length), block-aligned.
    log: Vec<(u64, u64, u64)>,
}

/// Why an RCT id cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the resilient change tracking id `{id}` is not valid for this virtual disk: {why}")]
pub struct InvalidRct {
    /// The id asked for.
    pub id: String,
    /// Why.
    pub why: &'static str,
}

impl Rct {
    /// A fresh log in epoch `epoch` (a GUID).
    pub fn new(epoch: String) -> Self {
        Self {
            epoch,
            generation: 1,
            log: Vec::new(),
        }
    }

    /// Records a guest write of `len` bytes at `off`, widened to whole tracking blocks.
    pub fn record(&mut self, off: u64, len: u64, size: u64) {
        if len == 0 {
            return;
        }
        let start = off / RCT_BLOCK * RCT_BLOCK;
        let end = (off + len)
            .div_ceil(RCT_BLOCK)
            .saturating_mul(RCT_BLOCK)
            .min(size);
        self.log.push((self.generation, start, end - start));
    }

    /// Freezes the current generation for a checkpoint: its RCT id.
    pub fn checkpoint(&mut self) -> String {
        let id = self.id_of(self.generation);
        self.generation += 1;
        id
    }

    /// The id of generation `g` in this epoch.
    pub fn id_of(&self, g: u64) -> String {
        format!("rctX:{}:{g:08X}", self.epoch)
    }

    /// The generation an id of this epoch names.
    pub fn generation_of(&self, id: &str) -> Result<u64, InvalidRct> {
        let bad = |why| InvalidRct {
            id: id.to_string(),
            why,
        };
        let rest = id
            .strip_prefix("rctX:")
            .ok_or_else(|| bad("it is not an RCT id"))?;
        let (epoch, g) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("it is not an RCT id"))?;
        if epoch != self.epoch {
            return Err(bad(
                "change tracking of the disk was reset since (the id belongs to an earlier tracking epoch)",
            ));
        }
        let g = u64::from_str_radix(g, 16).map_err(|_| bad("it is not an RCT id"))?;
        if g >= self.generation {
            return Err(bad("no checkpoint of the disk has this id yet"));
        }
        Ok(g)
    }

    /// Starts a new epoch: every earlier id becomes invalid.
    pub fn reset(&mut self, epoch: String) {
        *self = Self::new(epoch);
    }

    /// The changed ranges `(offset, length)` between generation `since` (exclusive) and `upto`
    /// (inclusive), merged and sorted.
    pub fn changes(&self, since: u64, upto: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .log
            .iter()
            .filter(|(g, ..)| *g > since && *g <= upto)
            .map(|(_, o, l)| (*o, *l))
            .collect();
        merge(&mut v);
        v
    }
}

/// Sorts and merges touching or overlapping `(offset, length)` ranges in place.
pub fn merge(v: &mut Vec<(u64, u64)>) {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for &(o, l) in v.iter() {
        match out.last_mut() {
            Some((lo, ll)) if o <= *lo + *ll => *ll = (*ll).max(o + l - *lo),
            _ => out.push((o, l)),
        }
    }
    *v = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_ids_and_resets() {
        let mut r = Rct::new("AAAA".into());
        r.record(100, 10, 1 << 20);
        let first = r.checkpoint();
        r.record(RCT_BLOCK * 3 + 5, 1, 1 << 20);
        r.record(RCT_BLOCK * 4, RCT_BLOCK, 1 << 20);
        let second = r.checkpoint();
        let (g1, g2) = (
            r.generation_of(&first).unwrap(),
            r.generation_of(&second).unwrap(),
        );
        assert_eq!(r.changes(0, g1), vec![(0, RCT_BLOCK)]);
        assert_eq!(r.changes(g1, g2), vec![(RCT_BLOCK * 3, RCT_BLOCK * 2)]);
        assert!(r.generation_of("rctX:AAAA:00000009").is_err());
        assert!(r.generation_of("garbage").is_err());
        r.reset("BBBB".into());
        let e = r.generation_of(&second).unwrap_err();
        assert!(e.to_string().contains("reset"), "{e}");
    }

    #[test]
    fn merge_joins_touching_ranges() {
        let mut v = vec![(10, 5), (0, 10), (30, 1), (14, 2)];
        merge(&mut v);
        assert_eq!(v, vec![(0, 16), (30, 1)]);
    }
}
