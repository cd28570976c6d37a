//! The head dims with kernels, read at compile time from `kernels/head_dims.h`: the line both
//! kernel dialects expand into their instantiations is the launch plans' list too, so a dim
//! added or removed there is added or removed here, with no second list to keep equal.

const HEADER: &[u8] = include_bytes!("../../kernels/head_dims.h");
const DEFINE: &[u8] = b"#define FLASH_HEAD_DIMS(X, ...)";
const ENTRY_TAIL: &[u8] = b", __VA_ARGS__)";

/// Head dimensions with compiled kernels (CUDA and Metal alike), ascending; a problem runs on
/// the smallest one >= its head_dim, the extra columns zero-filled and never stored.
pub const HEAD_DIMS: [usize; count(HEADER)] = parse(HEADER);

/// The kernel head dim a problem of head dim `d` runs on (`None`: larger than every kernel).
pub fn kernel_head_dim(d: usize) -> Option<usize> {
    HEAD_DIMS.iter().copied().find(|&k| k >= d)
}

const fn starts_at(s: &[u8], i: usize, pat: &[u8]) -> bool {
    if i + pat.len() > s.len() {
        return false;
    }
    let mut k = 0;
    while k < pat.len() {
        if s[i + k] != pat[k] {
            return false;
        }
        k += 1;
    }
    true
}

/// Byte range of the macro's body: from the end of the `#define` to the end of its line.
const fn body(src: &[u8]) -> (usize, usize) {
    let mut i = 0;
    while i < src.len() {
        if (i == 0 || src[i - 1] == b'\n') && starts_at(src, i, DEFINE) {
            let start = i + DEFINE.len();
            let mut end = start;
            while end < src.len() && src[end] != b'\n' {
                end += 1;
            }
            return (start, end);
        }
        i += 1;
    }
    panic!("kernels/head_dims.h: no `#define FLASH_HEAD_DIMS(X, ...)` line");
}

/// The entry `X(<dim>, __VA_ARGS__)` at or after `i` (spaces skipped): the dim and the index
/// past the entry, or `None` at the end of the body.
const fn next_entry(src: &[u8], mut i: usize, end: usize) -> Option<(usize, usize)> {
    while i < end && (src[i] == b' ' || src[i] == b'\t' || src[i] == b'\r') {
        i += 1;
    }
    if i == end {
        return None;
    }
    if !starts_at(src, i, b"X(") {
        panic!("kernels/head_dims.h: FLASH_HEAD_DIMS entries read `X(<dim>, __VA_ARGS__)`, on one line");
    }
    i += 2;
    let digits = i;
    let mut d = 0;
    while i < end && src[i].is_ascii_digit() {
        d = d * 10 + (src[i] - b'0') as usize;
        i += 1;
    }
    if i == digits || !starts_at(src, i, ENTRY_TAIL) || i + ENTRY_TAIL.len() > end {
        panic!("kernels/head_dims.h: FLASH_HEAD_DIMS entries read `X(<dim>, __VA_ARGS__)`, on one line");
    }
    Some((d, i + ENTRY_TAIL.len()))
}

const fn count(src: &[u8]) -> usize {
    let (mut i, end) = body(src);
    let mut n = 0;
    while let Some((_, next)) = next_entry(src, i, end) {
        n += 1;
        i = next;
    }
    assert!(n > 0, "kernels/head_dims.h: FLASH_HEAD_DIMS is empty");
    n
}

/// The `N` dims of the list; a compile error unless they ascend in multiples of 16 (the tile
/// products' k-step, which the kernels assume).
const fn parse<const N: usize>(src: &[u8]) -> [usize; N] {
    let (mut i, end) = body(src);
    let mut dims = [0; N];
    let mut n = 0;
    while let Some((d, next)) = next_entry(src, i, end) {
        assert!(
            d > 0 && d % 16 == 0,
            "kernels/head_dims.h: every head dim is a positive multiple of 16"
        );
        assert!(
            n == 0 || d > dims[n - 1],
            "kernels/head_dims.h: the head dims ascend"
        );
        dims[n] = d;
        n += 1;
        i = next;
    }
    dims
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &[u8] =
        b"// c\n#define FLASH_HEAD_DIMS(X, ...) X(16, __VA_ARGS__)  X(48, __VA_ARGS__)\r\nint x;\n";

    #[test]
    fn reads_the_entries_of_the_define_line() {
        assert_eq!(count(LIST), 2);
        assert_eq!(parse::<2>(LIST), [16, 48]);
    }

    #[test]
    #[should_panic(expected = "ascend")]
    fn rejects_a_list_out_of_order() {
        parse::<2>(b"#define FLASH_HEAD_DIMS(X, ...) X(64, __VA_ARGS__) X(32, __VA_ARGS__)\n");
    }

    #[test]
    #[should_panic(expected = "multiple of 16")]
    fn rejects_a_dim_the_tiles_cannot_hold() {
        parse::<1>(b"#define FLASH_HEAD_DIMS(X, ...) X(40, __VA_ARGS__)\n");
    }

    #[test]
    #[should_panic(expected = "on one line")]
    fn rejects_a_continued_line() {
        count(b"#define FLASH_HEAD_DIMS(X, ...) X(32, __VA_ARGS__) \\\n X(64, __VA_ARGS__)\n");
    }

    #[test]
    #[should_panic(expected = "no `#define")]
    fn rejects_a_header_without_the_list() {
        count(b"#define FLASH_DIMS(X) X(32)\n");
    }
}
