//! TensorBoard event files for scalars, written by hand (std only, no protobuf crate).
//!
//! An event file is a sequence of TFRecords:
//!
//! ```text
//! u64 LE  length
//! u32 LE  masked CRC32C of the 8 length bytes
//! [u8]    data (a serialized `tensorboard.Event` protobuf)
//! u32 LE  masked CRC32C of the data
//! ```
//!
//! with `mask(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). The first record
//! carries `file_version = "brain.Event:2"`; every scalar is one `Event { wall_time, step,
//! summary: Summary { value: [Value { tag, simple_value }] } }`.
//!
//! [`read_scalars`] reads such files back, checking both CRCs of every record. Besides
//! `simple_value` it understands the tensor form that newer TensorFlow / TensorBoard writers
//! use for scalars (`Value.tensor`: a one-element `DT_FLOAT` or `DT_DOUBLE` `TensorProto`, in
//! `float_val` / `double_val` or `tensor_content`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `file_version` of the first record, as TensorFlow writes it.
const FILE_VERSION: &str = "brain.Event:2";

/// TensorFlow `DataType` values the reader understands.
const DT_FLOAT: u64 = 1;
const DT_DOUBLE: u64 = 2;

/// Protobuf wire types.
const WT_VARINT: u8 = 0;
const WT_I64: u8 = 1;
const WT_LEN: u8 = 2;
const WT_I32: u8 = 5;

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli), table driven
// ---------------------------------------------------------------------------------------------

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) of `data`.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The TFRecord masking of a CRC.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

// ---------------------------------------------------------------------------------------------
// Protobuf encoding (only what an `Event` with a scalar needs)
// ---------------------------------------------------------------------------------------------

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(buf, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_len_delimited(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, WT_LEN);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// `Event` header fields: wall_time (1, double) and step (2, int64).
fn encode_event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut event = Vec::with_capacity(64);
    put_key(&mut event, 1, WT_I64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    put_key(&mut event, 2, WT_VARINT);
    // int64 is a plain (two's complement, 10 byte for negatives) varint, not zigzag.
    put_varint(&mut event, step as u64);
    event
}

fn encode_file_version_event(wall_time: f64) -> Vec<u8> {
    let mut event = encode_event_header(wall_time, 0);
    put_len_delimited(&mut event, 3, FILE_VERSION.as_bytes());
    event
}

fn encode_scalar_event(tag: &str, value: f32, step: i64, wall_time: f64) -> Vec<u8> {
    // Summary.Value { tag = 1; simple_value = 2 (float) }
    let mut sv = Vec::with_capacity(tag.len() + 8);
    put_len_delimited(&mut sv, 1, tag.as_bytes());
    put_key(&mut sv, 2, WT_I32);
    sv.extend_from_slice(&value.to_le_bytes());
    // Summary { repeated Value value = 1 }
    let mut summary = Vec::with_capacity(sv.len() + 4);
    put_len_delimited(&mut summary, 1, &sv);
    // Event { ...; summary = 5 }
    let mut event = encode_event_header(wall_time, step);
    put_len_delimited(&mut event, 5, &summary);
    event
}

/// One TFRecord around `data`.
fn frame_record(data: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    rec.extend_from_slice(&len);
    rec.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    rec.extend_from_slice(data);
    rec.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    rec
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host name for the file name (what `socket.gethostname()` gives TensorFlow), read without
/// libc; characters unsafe in a file name are replaced.
fn hostname() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".to_owned()
    } else {
        name
    }
}

fn with_path(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// Appends scalar events to a new TensorBoard event file. Writes are buffered; call
/// [`EventWriter::flush`] to make them visible to a running TensorBoard (dropping the writer
/// flushes too, ignoring errors).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (a local directory, with its parents) and a new file
    /// `events.out.tfevents.<unix secs>.<hostname>.<pid>.0` in it, and writes (and flushes) the
    /// `file_version` record. If that name is taken, the last number counts up instead of
    /// clobbering the other file. Errors name the path.
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        fs::create_dir_all(dir).map_err(|e| with_path(e, "creating directory", dir))?;
        let wall_time = now_secs_f64();
        let stem = format!(
            "events.out.tfevents.{}.{}.{}",
            wall_time as u64,
            hostname(),
            std::process::id()
        );
        let mut index = 0u32;
        let (path, file) = loop {
            let path = dir.join(format!("{stem}.{index}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && index < 1000 => index += 1,
                Err(e) => return Err(with_path(e, "creating event file", &path)),
            }
        };
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_record(&encode_file_version_event(wall_time))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a scalar stamped with the current wall time. `value` is stored as an f32
    /// (`simple_value` is a protobuf `float`).
    pub fn scalar(&mut self, tag: &str, value: f64, step: i64) -> io::Result<()> {
        self.scalar_at(tag, value, step, now_secs_f64())
    }

    /// Appends a scalar with an explicit wall time (seconds since the Unix epoch).
    pub fn scalar_at(
        &mut self,
        tag: &str,
        value: f64,
        step: i64,
        wall_time: f64,
    ) -> io::Result<()> {
        self.write_record(&encode_scalar_event(tag, value as f32, step, wall_time))
    }

    /// Writes buffered records through to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out
            .flush()
            .map_err(|e| with_path(e, "flushing event file", &self.path))
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        self.out
            .write_all(&frame_record(data))
            .map_err(|e| with_path(e, "writing event file", &self.path))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarEvent {
    pub tag: String,
    pub step: i64,
    pub value: f32,
    pub wall_time: f64,
}

/// A protobuf field value as found on the wire.
enum Field<'a> {
    Varint(u64),
    I64([u8; 8]),
    Len(&'a [u8]),
    I32([u8; 4]),
}

/// Minimal protobuf wire-format reader over one message.
struct ProtoReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        ProtoReader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at byte {} overruns the {}-byte message",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next_field(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let (field, wire_type) = (key >> 3, (key & 7) as u8);
        if field == 0 {
            return Err(format!("field number 0 before byte {}", self.pos));
        }
        let value = match wire_type {
            WT_VARINT => Field::Varint(self.varint()?),
            WT_I64 => Field::I64(self.take(8)?.try_into().unwrap()),
            WT_LEN => {
                let len = self.varint()?;
                let len = usize::try_from(len).map_err(|_| format!("length {len} too large"))?;
                Field::Len(self.take(len)?)
            }
            WT_I32 => Field::I32(self.take(4)?.try_into().unwrap()),
            other => {
                return Err(format!(
                    "unsupported wire type {other} (field {field}) before byte {}",
                    self.pos
                ));
            }
        };
        Ok(Some((field, value)))
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
}

/// Values of a `repeated` numeric field of `N`-byte fixed-width elements: packed or not.
fn push_fixed<const N: usize>(
    out: &mut Vec<[u8; N]>,
    field: Field<'_>,
    what: &str,
) -> Result<(), String> {
    match field {
        Field::Len(bytes) => {
            if bytes.len() % N != 0 {
                return Err(format!("packed {what} of {} bytes", bytes.len()));
            }
            out.extend(
                bytes
                    .chunks_exact(N)
                    .map(|c| <[u8; N]>::try_from(c).unwrap()),
            );
        }
        Field::I32(b) if N == 4 => out.push(b[..].try_into().unwrap()),
        Field::I64(b) if N == 8 => out.push(b[..].try_into().unwrap()),
        _ => return Err(format!("{what} has the wrong wire type")),
    }
    Ok(())
}

/// The scalar in a `TensorProto`, if it is a one-element DT_FLOAT or DT_DOUBLE tensor.
fn parse_tensor_scalar(buf: &[u8]) -> Result<Option<f32>, String> {
    let mut dtype = 0u64;
    let mut content: &[u8] = &[];
    let mut floats: Vec<[u8; 4]> = Vec::new();
    let mut doubles: Vec<[u8; 8]> = Vec::new();
    let mut r = ProtoReader::new(buf);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Field::Varint(v)) => dtype = v,
            (4, Field::Len(b)) => content = b,
            (5, v) => push_fixed(&mut floats, v, "TensorProto.float_val")?,
            (6, v) => push_fixed(&mut doubles, v, "TensorProto.double_val")?,
            _ => {}
        }
    }
    let value = match dtype {
        DT_FLOAT if !content.is_empty() => {
            (content.len() == 4).then(|| f32::from_le_bytes(content.try_into().unwrap()))
        }
        DT_FLOAT => (floats.len() == 1).then(|| f32::from_le_bytes(floats[0])),
        DT_DOUBLE if !content.is_empty() => {
            (content.len() == 8).then(|| f64::from_le_bytes(content.try_into().unwrap()) as f32)
        }
        DT_DOUBLE => (doubles.len() == 1).then(|| f64::from_le_bytes(doubles[0]) as f32),
        _ => None,
    };
    Ok(value)
}

/// `SummaryMetadata.plugin_data.plugin_name`, or "" when absent.
fn parse_plugin_name(buf: &[u8]) -> Result<String, String> {
    let mut name = String::new();
    let mut r = ProtoReader::new(buf);
    while let Some((field, value)) = r.next_field()? {
        if let (1, Field::Len(plugin_data)) = (field, value) {
            let mut p = ProtoReader::new(plugin_data);
            while let Some((field, value)) = p.next_field()? {
                if let (1, Field::Len(b)) = (field, value) {
                    name = utf8(b, "plugin_name")?;
                }
            }
        }
    }
    Ok(name)
}

/// `(tag, value)` of a `Summary.Value` holding a scalar: `simple_value`, or a one-element float
/// tensor whose metadata (if any) names no plugin other than "scalars".
fn parse_summary_value(buf: &[u8]) -> Result<Option<(String, f32)>, String> {
    let mut tag = String::new();
    let mut simple: Option<f32> = None;
    let mut tensor: Option<&[u8]> = None;
    let mut plugin = String::new();
    let mut r = ProtoReader::new(buf);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Field::Len(b)) => tag = utf8(b, "Summary.Value.tag")?,
            (2, Field::I32(b)) => {
                simple = Some(f32::from_le_bytes(b));
                tensor = None;
            }
            (8, Field::Len(b)) => {
                tensor = Some(b);
                simple = None;
            }
            // Any other member of the `value` oneof replaces an earlier scalar.
            (3..=6, _) => {
                simple = None;
                tensor = None;
            }
            (9, Field::Len(b)) => plugin = parse_plugin_name(b)?,
            _ => {}
        }
    }
    if let Some(v) = simple {
        return Ok(Some((tag, v)));
    }
    match tensor {
        Some(t) if plugin.is_empty() || plugin == "scalars" => {
            Ok(parse_tensor_scalar(t)?.map(|v| (tag, v)))
        }
        _ => Ok(None),
    }
}

/// Appends the scalars of one serialized `Event` to `out`.
fn parse_event(buf: &[u8], out: &mut Vec<ScalarEvent>) -> Result<(), String> {
    let mut wall_time = 0.0f64;
    let mut step = 0i64;
    let mut summaries: Vec<&[u8]> = Vec::new();
    let mut r = ProtoReader::new(buf);
    while let Some((field, value)) = r.next_field()? {
        match (field, value) {
            (1, Field::I64(b)) => wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => step = v as i64,
            (5, Field::Len(b)) => summaries.push(b),
            (1 | 2 | 5, _) => return Err(format!("Event field {field} has the wrong wire type")),
            _ => {}
        }
    }
    for summary in summaries {
        let mut s = ProtoReader::new(summary);
        while let Some((field, value)) = s.next_field()? {
            if let (1, Field::Len(v)) = (field, value)
                && let Some((tag, value)) = parse_summary_value(v)?
            {
                out.push(ScalarEvent {
                    tag,
                    step,
                    value,
                    wall_time,
                });
            }
        }
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes; fewer only at end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads every scalar of a TensorBoard event file, in file order: `simple_value` scalars and
/// one-element float tensors (the newer form). Both CRCs of every record are checked; a
/// truncated or corrupt record is an error naming the file and the record's byte offset.
pub fn read_scalars(path: &Path) -> io::Result<Vec<ScalarEvent>> {
    let file = File::open(path).map_err(|e| with_path(e, "opening event file", path))?;
    let mut r = BufReader::new(file);
    let bad = |kind: io::ErrorKind, offset: u64, msg: String| {
        io::Error::new(
            kind,
            format!(
                "event file {}: record at offset {offset}: {msg}",
                path.display()
            ),
        )
    };
    let io_err = |e: io::Error, offset: u64| bad(e.kind(), offset, e.to_string());
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; 12];
        let n = read_full(&mut r, &mut header).map_err(|e| io_err(e, offset))?;
        if n == 0 {
            return Ok(out);
        }
        if n < header.len() {
            return Err(bad(
                io::ErrorKind::UnexpectedEof,
                offset,
                format!("truncated header ({n} of 12 bytes)"),
            ));
        }
        let len_bytes: [u8; 8] = header[..8].try_into().unwrap();
        let len_crc = u32::from_le_bytes(header[8..].try_into().unwrap());
        if masked_crc32c(&len_bytes) != len_crc {
            return Err(bad(
                io::ErrorKind::InvalidData,
                offset,
                "length CRC mismatch".to_owned(),
            ));
        }
        let len = u64::from_le_bytes(len_bytes);
        let mut data = Vec::new();
        let got = (&mut r)
            .take(len)
            .read_to_end(&mut data)
            .map_err(|e| io_err(e, offset))?;
        let mut crc = [0u8; 4];
        let crc_got = if got as u64 == len {
            read_full(&mut r, &mut crc).map_err(|e| io_err(e, offset))?
        } else {
            0
        };
        if got as u64 != len || crc_got != 4 {
            return Err(bad(
                io::ErrorKind::UnexpectedEof,
                offset,
                format!(
                    "truncated: {len}-byte payload, file ends after {} of its {} bytes",
                    12 + got + crc_got,
                    len + 16
                ),
            ));
        }
        if masked_crc32c(&data) != u32::from_le_bytes(crc) {
            return Err(bad(
                io::ErrorKind::InvalidData,
                offset,
                "data CRC mismatch".to_owned(),
            ));
        }
        parse_event(&data, &mut out).map_err(|msg| {
            bad(
                io::ErrorKind::InvalidData,
                offset,
                format!("bad Event: {msg}"),
            )
        })?;
        offset += len + 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pipeline-tb-test-{}-{name}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b"a"), 0xC1D0_4330);
        // RFC 3720 (iSCSI) B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        let dec: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&dec), 0x113F_DB5C);
    }

    #[test]
    fn varint_encoding_of_negative_step() {
        let mut buf = Vec::new();
        put_varint(&mut buf, (-1i64) as u64);
        assert_eq!(
            buf,
            [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]
        );
        assert_eq!(ProtoReader::new(&buf).varint().unwrap() as i64, -1);
    }

    #[test]
    fn first_record_is_file_version() {
        let dir = scratch_dir("version");
        let w = EventWriter::create(&dir).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(
            name.ends_with(&format!(".{}.0", std::process::id())),
            "{name}"
        );
        let bytes = fs::read(w.path()).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), len + 16);
        let data = &bytes[12..12 + len];
        assert!(
            data.windows(FILE_VERSION.len())
                .any(|w| w == FILE_VERSION.as_bytes())
        );
        assert!(read_scalars(w.path()).unwrap().is_empty());
        // A second writer in the same second gets its own file.
        let w2 = EventWriter::create(&dir).unwrap();
        assert_ne!(w.path(), w2.path());
        drop((w, w2));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip() {
        let dir = scratch_dir("roundtrip").join("nested/run");
        let mut w = EventWriter::create(&dir).unwrap();
        let path = w.path().to_owned();
        w.scalar_at("loss/train", 0.75, 0, 1_700_000_000.25)
            .unwrap();
        w.scalar_at("loss/train", 0.5, 1, 1_700_000_001.5).unwrap();
        w.scalar_at("recall@1", 1.0 / 3.0, 1, 1_700_000_002.0)
            .unwrap();
        w.scalar_at("neg", -2.5, -7, 0.0).unwrap();
        w.scalar_at("big-step", 0.0, i64::MAX, 1.0).unwrap();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        w.scalar("lr", 1e-4, 42).unwrap();
        w.flush().unwrap();
        let got = read_scalars(&path).unwrap();
        let expect = [
            ("loss/train", 0, 0.75f32, 1_700_000_000.25),
            ("loss/train", 1, 0.5, 1_700_000_001.5),
            ("recall@1", 1, (1.0f64 / 3.0) as f32, 1_700_000_002.0),
            ("neg", -7, -2.5, 0.0),
            ("big-step", i64::MAX, 0.0, 1.0),
        ];
        assert_eq!(got.len(), expect.len() + 1);
        for (g, (tag, step, value, wall)) in got.iter().zip(expect) {
            assert_eq!(
                g,
                &ScalarEvent {
                    tag: tag.to_owned(),
                    step,
                    value,
                    wall_time: wall
                }
            );
        }
        let last = got.last().unwrap();
        assert_eq!(
            (last.tag.as_str(), last.step, last.value),
            ("lr", 42, 1e-4f32)
        );
        assert!((last.wall_time - before).abs() < 60.0);

        // Drop flushes buffered records.
        w.scalar_at("after", 3.0, 43, 5.0).unwrap();
        drop(w);
        let got = read_scalars(&path).unwrap();
        assert_eq!(got.last().unwrap().tag, "after");
        fs::remove_dir_all(scratch_dir("roundtrip")).ok();
    }

    #[test]
    fn corruption_and_truncation_are_detected() {
        let dir = scratch_dir("corrupt");
        let mut w = EventWriter::create(&dir).unwrap();
        w.scalar_at("a", 1.0, 1, 10.0).unwrap();
        w.scalar_at("b", 2.0, 2, 11.0).unwrap();
        w.flush().unwrap();
        let path = w.path().to_owned();
        drop(w);
        let good = fs::read(&path).unwrap();
        assert_eq!(read_scalars(&path).unwrap().len(), 2);
        let first_len = u64::from_le_bytes(good[..8].try_into().unwrap()) + 16;
        let second_len = u64::from_le_bytes(
            good[first_len as usize..first_len as usize + 8]
                .try_into()
                .unwrap(),
        ) + 16;
        let third = first_len + second_len;

        // Every single flipped byte is caught by one of the CRCs.
        let bad_path = dir.join("corrupt.tfevents");
        for i in 0..good.len() {
            let mut bytes = good.clone();
            bytes[i] ^= 0x20;
            fs::write(&bad_path, &bytes).unwrap();
            let err = read_scalars(&bad_path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "byte {i}: {err}");
            let record = if (i as u64) < first_len {
                0
            } else if (i as u64) < third {
                first_len
            } else {
                third
            };
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("offset {record}:")),
                "byte {i}: {msg}"
            );
            assert!(msg.contains("CRC mismatch"), "byte {i}: {msg}");
            assert!(msg.contains("corrupt.tfevents"), "{msg}");
        }

        // Every truncation that is not at a record boundary is an error at that record.
        for cut in 1..good.len() {
            fs::write(&bad_path, &good[..cut]).unwrap();
            let cut = cut as u64;
            if cut == first_len || cut == third {
                assert!(read_scalars(&bad_path).is_ok());
                continue;
            }
            let err = read_scalars(&bad_path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}: {err}");
            let record = if cut < first_len {
                0
            } else if cut < third {
                first_len
            } else {
                third
            };
            assert!(
                err.to_string().contains(&format!("offset {record}:")),
                "cut {cut}: {err}"
            );
        }

        let missing = dir.join("missing.tfevents");
        let err = read_scalars(&missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing.tfevents"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_error_names_the_path() {
        let dir = scratch_dir("blocked");
        fs::create_dir_all(&dir).unwrap();
        let blocker = dir.join("file");
        fs::write(&blocker, b"x").unwrap();
        let err = EventWriter::create(&blocker.join("run")).err().unwrap();
        assert!(
            err.to_string().contains(&blocker.display().to_string()),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// An event file written by TensorBoard 2.21.0's own writer (protobuf 7.36.2, no TensorFlow):
    ///
    /// ```python
    /// from tensorboard.summary.writer.event_file_writer import EventFileWriter
    /// from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
    /// from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    /// from tensorboard.plugins.text.summary_v2 import text_pb
    /// w = EventFileWriter(out)
    /// def ev(step, wall, summary):
    ///     w.add_event(event_pb2.Event(step=step, wall_time=wall, summary=summary))
    /// V = summary_pb2.Summary.Value
    /// ev(0, 1700000000.5, summary_pb2.Summary(value=[V(tag="loss", simple_value=0.75)]))
    /// ev(1, 1700000001.25, summary_pb2.Summary(value=[V(tag="loss", simple_value=0.5),
    ///                                                 V(tag="acc", simple_value=0.125)]))
    /// ev(2, 1700000002.0, scalar_pb("lr", 0.001))
    /// ev(-3, 1700000003.0, scalar_pb("lr", -2.5))
    /// t = tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE,
    ///                            tensor_content=np.float64(6.25).tobytes())
    /// ev(4, 1700000004.0, summary_pb2.Summary(value=[V(tag="dbl", tensor=t)]))
    /// ev(5, 1700000005.0, text_pb("note", "hello"))
    /// w.close()
    /// ```
    #[rustfmt::skip]
    const FIXTURE: &[u8] = &[
        0x48, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xfe, 0x92, 0x48, 0x9d, 0x09, 0x2e, 0xb7, 0x2c,
        0x33, 0xd5, 0xc2, 0xda, 0x41, 0x1a, 0x0d, 0x62, 0x72, 0x61, 0x69, 0x6e, 0x2e, 0x45, 0x76, 0x65,
        0x6e, 0x74, 0x3a, 0x32, 0x52, 0x2e, 0x0a, 0x2c, 0x74, 0x65, 0x6e, 0x73, 0x6f, 0x72, 0x62, 0x6f,
        0x61, 0x72, 0x64, 0x2e, 0x73, 0x75, 0x6d, 0x6d, 0x61, 0x72, 0x79, 0x2e, 0x77, 0x72, 0x69, 0x74,
        0x65, 0x72, 0x2e, 0x65, 0x76, 0x65, 0x6e, 0x74, 0x5f, 0x66, 0x69, 0x6c, 0x65, 0x5f, 0x77, 0x72,
        0x69, 0x74, 0x65, 0x72, 0x23, 0x80, 0x23, 0x4f, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0xa3, 0x7f, 0x4b, 0x22, 0x09, 0x00, 0x00, 0x20, 0x40, 0xfc, 0x54, 0xd9, 0x41, 0x2a, 0x0d, 0x0a,
        0x0b, 0x0a, 0x04, 0x6c, 0x6f, 0x73, 0x73, 0x15, 0x00, 0x00, 0x40, 0x3f, 0xb7, 0x03, 0xcd, 0xbd,
        0x26, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x73, 0x4f, 0xe3, 0x00, 0x09, 0x00, 0x00, 0x50,
        0x40, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0x01, 0x2a, 0x19, 0x0a, 0x0b, 0x0a, 0x04, 0x6c, 0x6f, 0x73,
        0x73, 0x15, 0x00, 0x00, 0x00, 0x3f, 0x0a, 0x0a, 0x0a, 0x03, 0x61, 0x63, 0x63, 0x15, 0x00, 0x00,
        0x00, 0x3e, 0xc1, 0x16, 0xcd, 0xff, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf4, 0xae,
        0xcc, 0x45, 0x09, 0x00, 0x00, 0x80, 0x40, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0x02, 0x2a, 0x1f, 0x0a,
        0x1d, 0x0a, 0x02, 0x6c, 0x72, 0x42, 0x0a, 0x08, 0x01, 0x12, 0x00, 0x2a, 0x04, 0x6f, 0x12, 0x83,
        0x3a, 0x4a, 0x0b, 0x0a, 0x09, 0x0a, 0x07, 0x73, 0x63, 0x61, 0x6c, 0x61, 0x72, 0x73, 0xad, 0x04,
        0x5c, 0x48, 0x35, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd6, 0xc5, 0x5d, 0xe6, 0x09, 0x00,
        0x00, 0xc0, 0x40, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x01, 0x2a, 0x1f, 0x0a, 0x1d, 0x0a, 0x02, 0x6c, 0x72, 0x42, 0x0a, 0x08, 0x01, 0x12, 0x00,
        0x2a, 0x04, 0x00, 0x00, 0x20, 0xc0, 0x4a, 0x0b, 0x0a, 0x09, 0x0a, 0x07, 0x73, 0x63, 0x61, 0x6c,
        0x61, 0x72, 0x73, 0x6b, 0xce, 0xf7, 0xf8, 0x22, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x78,
        0x11, 0x3d, 0xfd, 0x09, 0x00, 0x00, 0x00, 0x41, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0x04, 0x2a, 0x15,
        0x0a, 0x13, 0x0a, 0x03, 0x64, 0x62, 0x6c, 0x42, 0x0c, 0x08, 0x02, 0x22, 0x08, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x19, 0x40, 0xc7, 0xdf, 0x1b, 0xf2, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0xf4, 0xae, 0xcc, 0x45, 0x09, 0x00, 0x00, 0x40, 0x41, 0xfc, 0x54, 0xd9, 0x41, 0x10, 0x05,
        0x2a, 0x1f, 0x0a, 0x1d, 0x0a, 0x04, 0x6e, 0x6f, 0x74, 0x65, 0x42, 0x0b, 0x08, 0x07, 0x12, 0x00,
        0x42, 0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x4a, 0x08, 0x0a, 0x06, 0x0a, 0x04, 0x74, 0x65, 0x78,
        0x74, 0x75, 0x45, 0xe4, 0xf1,
    ];

    #[test]
    fn reads_tensorboard_written_fixture() {
        let dir = scratch_dir("fixture");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.out.tfevents.fixture");
        fs::write(&path, FIXTURE).unwrap();
        let got = read_scalars(&path).unwrap();
        let expect: &[(&str, i64, f32, f64)] = &[
            // simple_value; step 0 is omitted on the wire (proto3 default)
            ("loss", 0, 0.75, 1_700_000_000.5),
            // two values in one Summary
            ("loss", 1, 0.5, 1_700_000_001.25),
            ("acc", 1, 0.125, 1_700_000_001.25),
            // scalar_pb: DT_FLOAT tensor, float_val, plugin "scalars"
            ("lr", 2, 0.001, 1_700_000_002.0),
            ("lr", -3, -2.5, 1_700_000_003.0),
            // DT_DOUBLE tensor_content, no metadata
            ("dbl", 4, 6.25, 1_700_000_004.0),
            // ("note", 5): text plugin, DT_STRING, skipped
        ];
        assert_eq!(got.len(), expect.len(), "{got:?}");
        for (g, &(tag, step, value, wall)) in got.iter().zip(expect) {
            assert_eq!(
                g,
                &ScalarEvent {
                    tag: tag.to_owned(),
                    step,
                    value,
                    wall_time: wall
                }
            );
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
