//! ClickHouse's `Native` format, the columnar layout the server keeps data in, for the
//! writer's biggest inserts (millions of `indicators` rows from an offline run): the server
//! takes each column as one array instead of parsing rows one by one. Only what the writer
//! needs: plain (not `LowCardinality`, not `Nullable`) `String`, `Int64` and `Float64` columns
//! and a constant `UInt64`, in blocks without the TCP protocol's block info (what HTTP inserts read when the
//! client names no protocol revision).
//!
//! A block: the column count and the row count (unsigned LEB128), then per column its name, its
//! type (both as strings) and its values: a string as LEB128 length and bytes, a number as
//! 8 little-endian bytes.

/// One column of a block being encoded.
pub(crate) enum Column<'a, R> {
    Str(&'a str, fn(&R) -> &str),
    I64(&'a str, fn(&R) -> i64),
    F64(&'a str, fn(&R) -> f64),
    /// The same value in every row (an insert's version).
    ConstU64(&'a str, u64),
}

impl<R> Column<'_, R> {
    fn name(&self) -> &str {
        match self {
            Column::Str(n, _) | Column::I64(n, _) | Column::F64(n, _) | Column::ConstU64(n, _) => n,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Column::Str(..) => "String",
            Column::I64(..) => "Int64",
            Column::ConstU64(..) => "UInt64",
            Column::F64(..) => "Float64",
        }
    }
}

/// Appends one block of `rows` with `columns` (in the order of the INSERT's column list).
pub(crate) fn encode_block<R>(rows: &[R], columns: &[Column<'_, R>], out: &mut Vec<u8>) {
    put_varint(out, columns.len() as u64);
    put_varint(out, rows.len() as u64);
    for c in columns {
        put_str(out, c.name());
        put_str(out, c.type_name());
        match c {
            Column::Str(_, get) => {
                for r in rows {
                    put_str(out, get(r));
                }
            }
            Column::I64(_, get) => {
                out.reserve(rows.len() * 8);
                for r in rows {
                    out.extend_from_slice(&get(r).to_le_bytes());
                }
            }
            Column::F64(_, get) => {
                out.reserve(rows.len() * 8);
                for r in rows {
                    out.extend_from_slice(&get(r).to_le_bytes());
                }
            }
            Column::ConstU64(_, v) => {
                out.reserve(rows.len() * 8);
                for _ in rows {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// The column list of an INSERT of `columns`: `(a, b, c)`.
pub(crate) fn column_list<R>(columns: &[Column<'_, R>]) -> String {
    let names: Vec<&str> = columns.iter().map(Column::name).collect();
    format!("({})", names.join(", "))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_unsigned_leb128() {
        let enc = |v| {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            out
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(127), [127]);
        assert_eq!(enc(128), [0x80, 1]);
        assert_eq!(enc(300), [0xac, 2]);
        assert_eq!(enc(u64::MAX).len(), 10);
    }

    /// The bytes ClickHouse itself writes for
    /// `SELECT 'ab' AS s, toInt64(-2) AS i, toUInt64(3) AS u, 0.5 AS f FORMAT Native`.
    #[test]
    fn a_block_is_laid_out_as_clickhouse_writes_it() {
        struct R;
        let cols: [Column<'_, R>; 4] = [
            Column::Str("s", |_| "ab"),
            Column::I64("i", |_| -2),
            Column::ConstU64("u", 3),
            Column::F64("f", |_| 0.5),
        ];
        let mut out = Vec::new();
        encode_block(&[R], &cols, &mut out);
        let mut want: Vec<u8> = vec![4, 1];
        want.extend_from_slice(b"\x01s\x06String\x02ab");
        want.extend_from_slice(b"\x01i\x05Int64");
        want.extend_from_slice(&(-2i64).to_le_bytes());
        want.extend_from_slice(b"\x01u\x06UInt64");
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"\x01f\x07Float64");
        want.extend_from_slice(&0.5f64.to_le_bytes());
        assert_eq!(out, want);
        assert_eq!(column_list(&cols), "(s, i, u, f)");
    }
}
