//! Byte extents of a virtual disk and sets of them.
//!
//! An [`ExtentMap`] is kept normalized: sorted, non-empty, non-overlapping and non-adjacent
//! extents. Every operation preserves that, so two maps describing the same bytes compare equal.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// A half-open byte range `[offset, offset + length)` of a disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub length: u64,
}

impl Extent {
    /// An extent of `length` bytes at `offset`.
    pub const fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    /// One past the last byte (saturating, so hostile input cannot overflow).
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The extent as a `Range`.
    pub const fn range(&self) -> Range<u64> {
        self.offset..self.end()
    }

    /// True when the extent covers no bytes.
    pub const fn is_empty(&self) -> bool {
        self.length == 0
    }
}

impl From<Range<u64>> for Extent {
    fn from(r: Range<u64>) -> Self {
        Self::new(r.start, r.end.saturating_sub(r.start))
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{}", self.offset, self.length)
    }
}

/// A normalized set of byte extents.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<Extent>", into = "Vec<Extent>")]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl ExtentMap {
    /// The empty set.
    pub const fn new() -> Self {
        Self {
            extents: Vec::new(),
        }
    }

    /// One extent covering `range` (empty if the range is empty).
    pub fn from_range(range: Range<u64>) -> Self {
        let mut m = Self::new();
        m.insert(range);
        m
    }

    /// Builds a normalized map from extents in any order, overlapping or not.
    pub fn from_extents(extents: impl IntoIterator<Item = Extent>) -> Self {
        let mut v: Vec<Extent> = extents.into_iter().filter(|e| !e.is_empty()).collect();
        v.sort_unstable_by_key(|e| e.offset);
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    let end = last.end().max(e.end());
                    last.length = end - last.offset;
                }
                _ => out.push(e),
            }
        }
        Self { extents: out }
    }

    /// Adds `range`, merging with neighbours. Amortized O(1) when ranges arrive in order.
    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        if let Some(last) = self.extents.last_mut() {
            if range.start >= last.offset {
                if range.start <= last.end() {
                    let end = last.end().max(range.end);
                    last.length = end - last.offset;
                } else {
                    self.extents.push(range.into());
                }
                return;
            }
        } else {
            self.extents.push(range.into());
            return;
        }
        // Out of order: rebuild. Rare in practice (sources report extents in disk order).
        let mut v = std::mem::take(&mut self.extents);
        v.push(range.into());
        *self = Self::from_extents(v);
    }

    /// The extents, in disk order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Extent> + ExactSizeIterator + '_ {
        self.extents.iter().copied()
    }

    /// The extents as a slice, in disk order.
    pub fn as_slice(&self) -> &[Extent] {
        &self.extents
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    /// True when no byte is covered.
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Total bytes covered.
    pub fn total_len(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// True if `offset` lies in some extent.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.extents.partition_point(|e| e.end() <= offset);
        self.extents.get(i).is_some_and(|e| e.offset <= offset)
    }

    /// True if any byte of `range` is covered.
    pub fn intersects(&self, range: Range<u64>) -> bool {
        if range.start >= range.end {
            return false;
        }
        let i = self.extents.partition_point(|e| e.end() <= range.start);
        self.extents.get(i).is_some_and(|e| e.offset < range.end)
    }

    /// The part of the map inside `range`.
    pub fn clip(&self, range: Range<u64>) -> Self {
        let i = self.extents.partition_point(|e| e.end() <= range.start);
        let mut out = Self::new();
        for e in &self.extents[i..] {
            if e.offset >= range.end {
                break;
            }
            out.insert(e.offset.max(range.start)..e.end().min(range.end));
        }
        out
    }

    /// Bytes covered by either map.
    pub fn union(&self, other: &Self) -> Self {
        Self::from_extents(self.iter().chain(other.iter()))
    }

    /// Bytes covered by both maps.
    pub fn intersection(&self, other: &Self) -> Self {
        let (mut i, mut j) = (0, 0);
        let mut out = Self::new();
        while i < self.extents.len() && j < other.extents.len() {
            let (a, b) = (self.extents[i], other.extents[j]);
            let start = a.offset.max(b.offset);
            let end = a.end().min(b.end());
            if start < end {
                out.insert(start..end);
            }
            if a.end() < b.end() {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    /// Bytes of `within` that the map does not cover.
    pub fn complement(&self, within: Range<u64>) -> Self {
        let mut out = Self::new();
        let mut pos = within.start;
        for e in self.clip(within.clone()).iter() {
            if e.offset > pos {
                out.insert(pos..e.offset);
            }
            pos = e.end();
        }
        if pos < within.end {
            out.insert(pos..within.end);
        }
        out
    }

    /// Bytes covered by `self` but not by `other`.
    pub fn difference(&self, other: &Self) -> Self {
        let Some(end) = self.extents.last().map(Extent::end) else {
            return Self::new();
        };
        self.intersection(&other.complement(0..end))
    }

    /// Widens every extent outward to multiples of `grain` (clamped to `limit`), e.g. to turn
    /// changed bytes into the chunks they touch. `grain` must be non-zero.
    pub fn align_out(&self, grain: u64, limit: u64) -> Self {
        assert!(grain > 0, "grain must be non-zero");
        Self::from_extents(self.iter().map(|e| {
            let start = e.offset / grain * grain;
            let end = e.end().div_ceil(grain).saturating_mul(grain).min(limit);
            Extent::from(start..end.max(start))
        }))
    }

    /// Indices of the `grain`-sized cells that the map touches, ascending, each once.
    pub fn cells(&self, grain: u64) -> impl Iterator<Item = u64> + '_ {
        assert!(grain > 0, "grain must be non-zero");
        let mut next = 0u64;
        self.extents.iter().flat_map(move |e| {
            let first = (e.offset / grain).max(next);
            let last = (e.end() - 1) / grain;
            next = last + 1;
            first..=last
        })
    }
}

impl From<Vec<Extent>> for ExtentMap {
    fn from(v: Vec<Extent>) -> Self {
        Self::from_extents(v)
    }
}

impl From<ExtentMap> for Vec<Extent> {
    fn from(m: ExtentMap) -> Self {
        m.extents
    }
}

impl FromIterator<Extent> for ExtentMap {
    fn from_iter<T: IntoIterator<Item = Extent>>(iter: T) -> Self {
        Self::from_extents(iter)
    }
}

impl fmt::Debug for ExtentMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.extents.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits(m: &ExtentMap, n: u64) -> Vec<bool> {
        (0..n).map(|i| m.contains(i)).collect()
    }

    fn arb_map() -> impl Strategy<Value = ExtentMap> {
        proptest::collection::vec((0u64..200, 0u64..40), 0..12)
            .prop_map(|v| v.into_iter().map(|(o, l)| Extent::new(o, l)).collect())
    }

    #[test]
    fn insert_merges_adjacent_and_overlapping() {
        let mut m = ExtentMap::new();
        m.insert(0..10);
        m.insert(10..20);
        m.insert(30..40);
        m.insert(5..32);
        assert_eq!(m.as_slice(), &[Extent::new(0, 40)]);
    }

    #[test]
    fn cells_counts_each_chunk_once() {
        let m = ExtentMap::from_extents([Extent::new(1, 2), Extent::new(5, 1), Extent::new(9, 8)]);
        assert_eq!(m.cells(4).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        let m = ExtentMap::from_extents([Extent::new(0, 1), Extent::new(3, 1)]);
        assert_eq!(m.cells(4).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn serde_round_trip_normalizes() {
        let json = r#"[{"offset":10,"length":5},{"offset":0,"length":12}]"#;
        let m: ExtentMap = serde_json::from_str(json).unwrap();
        assert_eq!(m.as_slice(), &[Extent::new(0, 15)]);
    }

    proptest! {
        #[test]
        fn set_algebra_matches_bitsets(a in arb_map(), b in arb_map()) {
            let n = 260;
            let (ba, bb) = (bits(&a, n), bits(&b, n));
            let u: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x || *y).collect();
            let i: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && *y).collect();
            let d: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && !*y).collect();
            let c: Vec<bool> = ba.iter().map(|x| !*x).collect();
            prop_assert_eq!(bits(&a.union(&b), n), u);
            prop_assert_eq!(bits(&a.intersection(&b), n), i);
            prop_assert_eq!(bits(&a.difference(&b), n), d);
            prop_assert_eq!(bits(&a.complement(0..n), n), c);
            prop_assert_eq!(a.total_len(), ba.iter().filter(|x| **x).count() as u64);
        }

        #[test]
        fn normalized_form_is_canonical(a in arb_map()) {
            for w in a.as_slice().windows(2) {
                prop_assert!(w[0].end() < w[1].offset);
            }
            prop_assert!(a.iter().all(|e| !e.is_empty()));
            let rebuilt: ExtentMap = a.iter().rev().collect();
            prop_assert_eq!(rebuilt, a);
        }

        #[test]
        fn align_out_covers_and_stays_on_grid(a in arb_map(), g in 1u64..17) {
            let al = a.align_out(g, 1000);
            prop_assert_eq!(a.difference(&al).total_len(), 0);
            for e in al.iter() {
                prop_assert_eq!(e.offset % g, 0);
            }
            let cells: Vec<u64> = a.cells(g).collect();
            let expect: Vec<u64> = (0..300 / g + 1).filter(|c| a.intersects(c * g..(c + 1) * g)).collect();
            prop_assert_eq!(cells, expect);
        }

        #[test]
        fn clip_and_intersects_agree(a in arb_map(), s in 0u64..250, l in 0u64..60) {
            let clipped = a.clip(s..s + l);
            prop_assert_eq!(clipped.clone(), a.intersection(&ExtentMap::from_range(s..s + l)));
            prop_assert_eq!(a.intersects(s..s + l), !clipped.is_empty());
        }
    }
}
