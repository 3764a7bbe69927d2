//! Placing a disk's partitions: segments between fixed starts, each
//! partition's minimum first, the space left shared by weight up to each
//! maximum, the configdrive at the end. Pure.

use super::rules::Sizing;
use super::{Inventory, PlanError, MIB};
use crate::provision::scheme::{DiskSpec, Role};

/// Place the partitions: segments between fixed starts, minimums first,
/// the rest by weight; the configdrive (last) at the segment's end.
pub(super) fn layout(
    d: &DiskSpec,
    inv: &Inventory,
    s: &[Sizing],
    first: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>, PlanError> {
    // Segment boundaries: index where each segment begins.
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend((1..s.len()).filter(|&i| s[i].start.is_some()));
    let mut out = Vec::with_capacity(s.len());
    let mut cursor = first;
    for (k, &b) in bounds.iter().enumerate() {
        let stop = bounds.get(k + 1).copied().unwrap_or(s.len());
        let seg_start = s.get(b).and_then(|x| x.start).unwrap_or(cursor);
        if seg_start < cursor {
            return Err(PlanError::Overlap {
                disk: d.name.clone(),
                number: b + 1,
                start: seg_start,
                prev_end: cursor,
            });
        }
        let seg_end = match bounds.get(k + 1) {
            Some(&n) => s[n].start.unwrap_or(end),
            None => end,
        };
        let part = &s[b..stop];
        let need: u64 = part.iter().map(|x| x.min).sum();
        if seg_start.saturating_add(need) > seg_end {
            if k + 1 < bounds.len() {
                return Err(PlanError::Overlap {
                    disk: d.name.clone(),
                    number: stop + 1,
                    start: seg_end,
                    prev_end: seg_start + need,
                });
            }
            return Err(PlanError::DoesNotFit {
                disk: d.name.clone(),
                path: inv.path.clone(),
                need: seg_start - first + need,
                have: end - first,
            });
        }
        let sizes = share(
            part,
            seg_end - seg_start - need,
            d.align_mib.unwrap_or(1) * MIB,
        );
        let mut at = seg_start;
        for (i, sz) in sizes.iter().enumerate() {
            let last_cd = stop == s.len()
                && i + 1 == sizes.len()
                && d.partitions.iter().any(|p| p.role == Role::Configdrive);
            let start = if last_cd { seg_end - sz } else { at };
            out.push((start, *sz));
            at = start + sz;
        }
        cursor = at;
    }
    Ok(out)
}

/// Sizes: each minimum plus a weighted share of `free`, capped at the
/// maximums (a capped partition's excess is shared again), aligned down.
fn share(part: &[Sizing], mut free: u64, align: u64) -> Vec<u64> {
    let mut sizes: Vec<u64> = part.iter().map(|x| x.min).collect();
    let mut active: Vec<usize> = (0..part.len()).filter(|&i| part[i].weight > 0).collect();
    loop {
        let total: u128 = active.iter().map(|&i| u128::from(part[i].weight)).sum();
        if total == 0 || free < align {
            return sizes;
        }
        let grant = |i: usize| {
            let g = u128::from(free) * u128::from(part[i].weight) / total;
            (g as u64) / align * align
        };
        let capped: Vec<usize> = active
            .iter()
            .copied()
            .filter(|&i| sizes[i].saturating_add(grant(i)) > part[i].max)
            .collect();
        if capped.is_empty() {
            for &i in &active {
                sizes[i] += grant(i);
            }
            return sizes;
        }
        for i in capped {
            free -= part[i].max - sizes[i];
            sizes[i] = part[i].max;
            active.retain(|&a| a != i);
        }
    }
}
