//! Copy buffers kept for reuse by the thread that let them go.
//!
//! A connection holds a buffer only while bytes flow (an idle one holds
//! none, see [`crate::carry::copy::ReadSide`]), so a request/response connection takes
//! a buffer for each exchange and gives it back once it is written. With
//! the allocator alone that was an allocation, a zeroing and a free per
//! direction per exchange: a third of the plain proxy path's user-space
//! instructions under load (callgrind). Kept here, a buffer is reused as
//! it was left: only the bytes a read puts in it are ever written out.

use std::cell::RefCell;

/// The sizes kept: the copy's, from its first buffer doubling to its
/// largest.
pub const SMALLEST: usize = 1024;
pub const LARGEST: usize = 16 * 1024;
const SIZES: usize = (LARGEST / SMALLEST).trailing_zeros() as usize + 1;

/// At most this many bytes of each size are kept by a thread: 640 KiB
/// for all five, at most, per data-plane thread.
const KEPT_PER_SIZE: usize = 128 * 1024;

thread_local! {
    static SPARE: RefCell<[Vec<Vec<u8>>; SIZES]> =
        const { RefCell::new([const { Vec::new() }; SIZES]) };
}

/// The place of `size` among the kept sizes.
fn kept(size: usize) -> Option<usize> {
    if size < SMALLEST || !size.is_power_of_two() {
        return None;
    }
    let at = (size / SMALLEST).trailing_zeros() as usize;
    (at < SIZES).then_some(at)
}

/// A buffer of `size` bytes, its contents unspecified.
pub fn take(size: usize) -> Vec<u8> {
    let spare = kept(size).and_then(|at| SPARE.try_with(|s| s.borrow_mut()[at].pop()).ok()?);
    spare.unwrap_or_else(|| vec![0; size])
}

/// Gives `buf` back: kept for the next [`take`] of its size on this
/// thread, or freed (a size not kept, or enough of it kept already).
pub fn give(buf: Vec<u8>) {
    let Some(at) = kept(buf.len()).filter(|_| buf.capacity() == buf.len()) else {
        return;
    };
    // A buffer dropped as its thread exits (its thread-local store gone
    // already) is freed.
    let _ = SPARE.try_with(|s| {
        let mut spare = s.borrow_mut();
        if (spare[at].len() + 1) * buf.len() <= KEPT_PER_SIZE {
            spare[at].push(buf);
        }
    });
}

/// Gives back what `buf` holds, leaving it empty.
pub fn give_back(buf: &mut Vec<u8>) {
    if buf.capacity() > 0 {
        give(std::mem::take(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_and_the_kept_bytes_are_bounded() {
        let first = take(2048);
        let at = first.as_ptr();
        assert_eq!(first.len(), 2048);
        give(first);
        let again = take(2048);
        assert_eq!(again.as_ptr(), at, "the same buffer, not a new one");
        assert_eq!(again.len(), 2048);
        // Sizes not kept are freed.
        give(vec![0; 3000]);
        give(Vec::with_capacity(4096));
        assert_eq!(
            SPARE.with(|s| s.borrow().iter().map(Vec::len).sum::<usize>()),
            0
        );
        let many: Vec<_> = (0..200).map(|_| take(1024)).collect();
        many.into_iter().for_each(give);
        let kept_bytes: usize =
            SPARE.with(|s| s.borrow().iter().flat_map(|v| v.iter().map(Vec::len)).sum());
        assert_eq!(kept_bytes, KEPT_PER_SIZE);
        assert_eq!(SIZES, 5);
    }
}
