//! RFC 6455 framing: an incremental decoder with hard limits, frame encoders, and a
//! boundary tracker for relays.
//!
//! The decoder is fed whatever bytes a socket read returned and calls back once per complete
//! message or control frame. It keeps no buffer while idle: a message that arrives whole in
//! one read is unmasked in place and handed out borrowed; only a message split across reads
//! is copied, into a buffer that is freed as soon as the message completes. It enforces what
//! fastwebsockets 0.10 leaves to the application: client frames must be masked, a fragmented
//! message has a total size cap checked *before* its bytes are buffered, and invalid UTF-8 is
//! detected as soon as it arrives (fail fast), also across fragments.

use bytes::{BufMut, Bytes, BytesMut};

use crate::close;

/// Continuation frame.
pub const OP_CONTINUATION: u8 = 0x0;
/// Text frame.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Ping frame.
pub const OP_PING: u8 = 0x9;
/// Pong frame.
pub const OP_PONG: u8 = 0xA;

/// Largest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Largest control frame payload.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Which end of the connection the decoder sits at; it decides the masking rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decodes client frames: every frame must be masked.
    Server,
    /// Decodes server frames: no frame may be masked.
    Client,
}

/// Decoder limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload of a single frame.
    pub max_frame: usize,
    /// Largest reassembled message (sum of its fragments).
    pub max_message: usize,
}

impl Limits {
    /// Frames and messages up to `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max_frame: max,
            max_message: max,
        }
    }
}

/// A complete message or control frame, borrowed from the input or the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame: `None` when it carried no status code.
    Close(Option<(u16, &'a str)>),
}

/// A protocol violation: the connection must be closed with `close_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {close_code})")]
pub struct Violation {
    pub close_code: u16,
    pub reason: &'static str,
}

const fn violation(close_code: u16, reason: &'static str) -> Violation {
    Violation { close_code, reason }
}

/// What the message callback wants the decoder to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep decoding the input.
    Continue,
    /// Stop here; the remaining input is discarded (the connection is closing).
    Stop,
}

#[derive(Debug)]
struct FrameState {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: usize,
    done: usize,
}

/// Incremental frame decoder. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    role: Role,
    limits: Limits,
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: usize,
    frame: Option<FrameState>,
    /// Opcode of the data message in progress (set from its first frame until its last).
    msg_kind: Option<u8>,
    msg: Vec<u8>,
    /// Prefix of `msg` known to be valid UTF-8 (text messages only).
    utf8_ok: usize,
    ctrl: Vec<u8>,
    stopped: bool,
}

impl Decoder {
    /// A decoder for `role` with `limits`.
    pub fn new(role: Role, limits: Limits) -> Self {
        Self {
            role,
            limits,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            frame: None,
            msg_kind: None,
            msg: Vec::new(),
            utf8_ok: 0,
            ctrl: Vec::new(),
            stopped: false,
        }
    }

    /// Bytes currently buffered for incomplete messages (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.msg.capacity() + self.ctrl.capacity()
    }

    /// Whether no frame is partially decoded.
    pub fn at_frame_boundary(&self) -> bool {
        self.hdr_len == 0 && self.frame.is_none()
    }

    /// Feeds bytes read from the socket. `input` is unmasked in place. Calls `on_message` for
    /// every complete message; returns `Ok(Flow::Stop)` if the callback stopped, or the
    /// violation that requires closing the connection. After a violation or a stop, further
    /// input is ignored.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        on_message: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        if self.stopped {
            return Ok(Flow::Stop);
        }
        let result = self.feed_inner(input, on_message);
        if !matches!(result, Ok(Flow::Continue)) {
            self.stopped = true;
            self.msg = Vec::new();
            self.ctrl = Vec::new();
        }
        result
    }

    fn feed_inner(
        &mut self,
        input: &mut [u8],
        on_message: &mut dyn FnMut(Message<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        let mut pos = 0;
        loop {
            if self.frame.is_none() {
                let rest = input.get(pos..).unwrap_or_default();
                let used = self.read_header(rest)?;
                pos += used;
                if self.frame.is_none() {
                    return Ok(Flow::Continue);
                }
            }
            let Some(fs) = self.frame.as_mut() else {
                return Ok(Flow::Continue);
            };
            let want = fs.len - fs.done;
            let avail = input.len().saturating_sub(pos);
            let single = fs.opcode >= OP_CLOSE || (fs.fin && fs.opcode != OP_CONTINUATION);
            if fs.done == 0 && avail >= want && single {
                // Fast path: the whole frame is in this read and is a whole message.
                let (opcode, mask) = (fs.opcode, fs.mask);
                self.frame = None;
                let Some(payload) = input.get_mut(pos..pos + want) else {
                    return Ok(Flow::Continue);
                };
                pos += want;
                if let Some(mask) = mask {
                    apply_mask(payload, mask, 0);
                }
                if opcode < OP_CLOSE {
                    self.msg_kind = None;
                }
                if deliver(opcode, payload, on_message)? == Flow::Stop {
                    return Ok(Flow::Stop);
                }
                continue;
            }
            if avail == 0 && want > 0 {
                return Ok(Flow::Continue);
            }
            let take = want.min(avail);
            let Some(chunk) = input.get_mut(pos..pos + take) else {
                return Ok(Flow::Continue);
            };
            pos += take;
            if let Some(mask) = fs.mask {
                apply_mask(chunk, mask, fs.done);
            }
            fs.done += take;
            let complete = fs.done == fs.len;
            let (opcode, fin) = (fs.opcode, fs.fin);
            if opcode >= OP_CLOSE {
                self.ctrl.extend_from_slice(chunk);
                if complete {
                    self.frame = None;
                    let payload = std::mem::take(&mut self.ctrl);
                    if deliver(opcode, &payload, on_message)? == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                }
                continue;
            }
            self.msg.extend_from_slice(chunk);
            let text = self.msg_kind == Some(OP_TEXT);
            if text {
                self.check_utf8_prefix()?;
            }
            if complete {
                self.frame = None;
                if fin {
                    if text && self.utf8_ok != self.msg.len() {
                        return Err(violation(close::INVALID_PAYLOAD, "text is not valid UTF-8"));
                    }
                    let kind = self.msg_kind.take().unwrap_or(OP_BINARY);
                    let payload = std::mem::take(&mut self.msg);
                    self.utf8_ok = 0;
                    if deliver(kind, &payload, on_message)? == Flow::Stop {
                        return Ok(Flow::Stop);
                    }
                }
            }
        }
    }

    /// Validates the not-yet-checked tail of a text message, tolerating only an incomplete
    /// code point at the very end (it may be completed by the next bytes).
    fn check_utf8_prefix(&mut self) -> Result<(), Violation> {
        let tail = self.msg.get(self.utf8_ok..).unwrap_or_default();
        match std::str::from_utf8(tail) {
            Ok(_) => self.utf8_ok = self.msg.len(),
            Err(e) if e.error_len().is_none() => self.utf8_ok += e.valid_up_to(),
            Err(_) => return Err(violation(close::INVALID_PAYLOAD, "text is not valid UTF-8")),
        }
        Ok(())
    }

    /// Consumes header bytes from `input`; sets `self.frame` once a header is complete and
    /// valid. Returns how many bytes it used.
    fn read_header(&mut self, input: &[u8]) -> Result<usize, Violation> {
        let mut used = 0;
        let mut need = 2;
        let mut checked = false;
        loop {
            while self.hdr_len < need {
                let Some(&b) = input.get(used) else {
                    return Ok(used);
                };
                if let Some(slot) = self.hdr.get_mut(self.hdr_len) {
                    *slot = b;
                }
                self.hdr_len += 1;
                used += 1;
            }
            let [b0, b1, ..] = self.hdr;
            let ext = match b1 & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let full = 2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 };
            if !checked {
                self.check_first_bytes(b0, b1)?;
                checked = true;
                need = full;
                continue;
            }
            break;
        }
        let [b0, b1, rest @ ..] = self.hdr;
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        let (len, after) = match b1 & 0x7F {
            126 => (u64::from(u16::from_be_bytes([rest[0], rest[1]])), 2),
            127 => {
                let v = u64::from_be_bytes([
                    rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6], rest[7],
                ]);
                if v >> 63 != 0 {
                    return Err(violation(
                        close::PROTOCOL_ERROR,
                        "frame length has the high bit set",
                    ));
                }
                (v, 8)
            }
            n => (u64::from(n), 0),
        };
        // `after` is 0, 2 or 8 and `rest` holds 12 bytes, so the four mask bytes are there.
        let mask = masked.then(|| {
            let mut m = [0u8; 4];
            if let Some(bytes) = rest.get(after..after + 4) {
                m.copy_from_slice(bytes);
            }
            m
        });
        self.hdr_len = 0;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.limits.max_frame {
            return Err(violation(
                close::MESSAGE_TOO_BIG,
                "frame exceeds the size limit",
            ));
        }
        if opcode < OP_CLOSE {
            match (opcode, self.msg_kind) {
                (OP_CONTINUATION, None) => {
                    return Err(violation(
                        close::PROTOCOL_ERROR,
                        "continuation frame without a message",
                    ))
                }
                (OP_TEXT | OP_BINARY, Some(_)) => {
                    return Err(violation(
                        close::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    ))
                }
                (OP_TEXT | OP_BINARY, None) => self.msg_kind = Some(opcode),
                _ => {}
            }
            if self.msg.len().saturating_add(len) > self.limits.max_message {
                return Err(violation(
                    close::MESSAGE_TOO_BIG,
                    "message exceeds the size limit",
                ));
            }
        }
        self.frame = Some(FrameState {
            fin,
            opcode,
            mask,
            len,
            done: 0,
        });
        Ok(used)
    }

    fn check_first_bytes(&self, b0: u8, b1: u8) -> Result<(), Violation> {
        if b0 & 0x70 != 0 {
            return Err(violation(
                close::PROTOCOL_ERROR,
                "reserved bits set without an extension",
            ));
        }
        let opcode = b0 & 0x0F;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(violation(close::PROTOCOL_ERROR, "reserved opcode"));
        }
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => {
                return Err(violation(
                    close::PROTOCOL_ERROR,
                    "client frame is not masked",
                ))
            }
            (Role::Client, true) => {
                return Err(violation(close::PROTOCOL_ERROR, "server frame is masked"))
            }
            _ => {}
        }
        if opcode >= OP_CLOSE {
            if b0 & 0x80 == 0 {
                return Err(violation(close::PROTOCOL_ERROR, "fragmented control frame"));
            }
            if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                return Err(violation(
                    close::PROTOCOL_ERROR,
                    "control frame payload over 125 bytes",
                ));
            }
        }
        Ok(())
    }
}

fn deliver(
    opcode: u8,
    payload: &[u8],
    on_message: &mut dyn FnMut(Message<'_>) -> Flow,
) -> Result<Flow, Violation> {
    let msg = match opcode {
        OP_TEXT => match std::str::from_utf8(payload) {
            Ok(text) => Message::Text(text),
            Err(_) => return Err(violation(close::INVALID_PAYLOAD, "text is not valid UTF-8")),
        },
        OP_BINARY => Message::Binary(payload),
        OP_PING => Message::Ping(payload),
        OP_PONG => Message::Pong(payload),
        OP_CLOSE => Message::Close(parse_close(payload)?),
        _ => return Err(violation(close::PROTOCOL_ERROR, "reserved opcode")),
    };
    Ok(on_message(msg))
}

/// Parses a close frame payload: empty, or a valid code plus a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(violation(
            close::PROTOCOL_ERROR,
            "close payload of one byte",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let reason = std::str::from_utf8(reason).map_err(|_| {
                violation(close::INVALID_PAYLOAD, "close reason is not valid UTF-8")
            })?;
            if !close::is_valid_on_wire(code) {
                return Err(violation(close::PROTOCOL_ERROR, "invalid close code"));
            }
            Ok(Some((code, reason)))
        }
    }
}

/// XORs `data` with `mask`, where `data` starts `offset` bytes into the frame payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let rotated = mask_rotated(mask, offset);
    let word = u32::from_ne_bytes(rotated);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u32::from_ne_bytes(buf) ^ word).to_ne_bytes());
    }
    for (b, m) in chunks.into_remainder().iter_mut().zip(rotated.iter()) {
        *b ^= m;
    }
}

fn mask_rotated(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let mut m = mask;
    m.rotate_left(offset % 4);
    m
}

/// A frame header, as [`parse_header`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// Bytes the header takes (2 to [`MAX_HEADER_LEN`]); the payload starts here.
    pub header_len: usize,
    /// Payload length as sent (not checked against any limit).
    pub payload_len: u64,
}

/// Reads the frame header at the start of `buf`, without validating it; `None` while `buf`
/// does not hold all of it yet. For a one-off look at a frame (the LB's first-message check);
/// the [`Decoder`] and the [`FrameTracker`] follow a stream byte by byte instead.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let m: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(m)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        mask,
        header_len: pos,
        payload_len,
    })
}

/// Writes a frame header (FIN set) for a payload of `len` bytes.
pub fn put_header(out: &mut BytesMut, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    put_header_fin(out, true, opcode, len, mask);
}

/// Writes a frame header with an explicit FIN bit.
pub fn put_header_fin(
    out: &mut BytesMut,
    fin: bool,
    opcode: u8,
    len: usize,
    mask: Option<[u8; 4]>,
) {
    out.put_u8(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(mask_bit | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(mask_bit | 126);
        out.put_u16(len);
    } else {
        out.put_u8(mask_bit | 127);
        out.put_u64(len as u64);
    }
    if let Some(mask) = mask {
        out.put_slice(&mask);
    }
}

/// Encodes one unmasked (server → client) frame with FIN set.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut out, opcode, payload.len(), None);
    out.put_slice(payload);
    out.freeze()
}

/// Encodes one masked (client → server) frame with FIN set.
pub fn encode_masked_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Bytes {
    encode_masked_frame_fin(true, opcode, payload, mask)
}

/// Encodes one masked (client → server) frame with an explicit FIN bit.
pub fn encode_masked_frame_fin(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + MAX_HEADER_LEN);
    put_header_fin(&mut out, fin, opcode, payload.len(), Some(mask));
    let start = out.len();
    out.put_slice(payload);
    if let Some(body) = out.get_mut(start..) {
        apply_mask(body, mask, 0);
    }
    out.freeze()
}

/// The payload of a close frame: code and reason (truncated to fit 125 bytes).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let reason = close::truncate_reason(reason);
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(reason.as_bytes());
    p
}

/// An unmasked close frame with `code` and `reason`.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    encode_frame(OP_CLOSE, &close_payload(code, reason))
}

/// Follows frame boundaries in a byte stream without buffering payloads, so a relay knows
/// when it may inject a frame of its own (a close frame) without corrupting the stream.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    remaining: u64,
    close_seen: bool,
}

impl FrameTracker {
    /// A tracker positioned at the start of a frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Advances over bytes that passed through the relay.
    pub fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.remaining -= skip as u64;
                bytes = bytes.get(skip..).unwrap_or_default();
                continue;
            }
            let Some((&b, rest)) = bytes.split_first() else {
                break;
            };
            bytes = rest;
            if let Some(slot) = self.hdr.get_mut(usize::from(self.hdr_len)) {
                *slot = b;
            }
            self.hdr_len += 1;
            if self.hdr_len < 2 {
                continue;
            }
            let [b0, b1, rest @ ..] = self.hdr;
            let ext: u8 = match b1 & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask_len: u8 = if b1 & 0x80 != 0 { 4 } else { 0 };
            if self.hdr_len < 2 + ext + mask_len {
                continue;
            }
            self.remaining = match ext {
                2 => u64::from(u16::from_be_bytes([rest[0], rest[1]])),
                8 => u64::from_be_bytes([
                    rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6], rest[7],
                ]),
                _ => u64::from(b1 & 0x7F),
            };
            if b0 & 0x0F == OP_CLOSE {
                self.close_seen = true;
            }
            self.hdr_len = 0;
        }
    }

    /// Whether the stream is between two frames.
    pub fn at_boundary(&self) -> bool {
        self.hdr_len == 0 && self.remaining == 0
    }

    /// Bytes left in the current frame's payload, or `None` while inside a frame header
    /// (whose length is not known yet). `Some(0)` at a boundary.
    pub fn bytes_to_boundary(&self) -> Option<u64> {
        (self.hdr_len == 0).then_some(self.remaining)
    }

    /// Whether a close frame header has passed.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn own(m: Message<'_>) -> Owned {
        match m {
            Message::Text(t) => Owned::Text(t.to_owned()),
            Message::Binary(b) => Owned::Binary(b.to_vec()),
            Message::Ping(b) => Owned::Ping(b.to_vec()),
            Message::Pong(b) => Owned::Pong(b.to_vec()),
            Message::Close(c) => Owned::Close(c.map(|(c, r)| (c, r.to_owned()))),
        }
    }

    fn decode_chunks(
        limits: Limits,
        bytes: &[u8],
        chunk: usize,
    ) -> (Vec<Owned>, Result<Flow, Violation>) {
        let mut d = Decoder::new(Role::Server, limits);
        let mut out = Vec::new();
        let mut data = bytes.to_vec();
        let mut last = Ok(Flow::Continue);
        for piece in data.chunks_mut(chunk.max(1)) {
            last = d.feed(piece, &mut |m| {
                out.push(own(m));
                Flow::Continue
            });
            if last.is_err() {
                break;
            }
        }
        (out, last)
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        encode_masked_frame_fin(fin, opcode, payload, MASK).to_vec()
    }

    #[test]
    fn decodes_a_masked_text_frame_in_every_split() {
        let f = frame(true, OP_TEXT, "héllo wörld".as_bytes());
        for chunk in 1..=f.len() {
            let (msgs, r) = decode_chunks(Limits::new(1024), &f, chunk);
            assert_eq!(r, Ok(Flow::Continue));
            assert_eq!(
                msgs,
                vec![Owned::Text("héllo wörld".into())],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut s = frame(false, OP_TEXT, b"ab");
        s.extend(frame(true, OP_PING, b"p"));
        s.extend(frame(false, OP_CONTINUATION, b"cd"));
        s.extend(frame(true, OP_CONTINUATION, b"ef"));
        s.extend(frame(true, OP_BINARY, &[1, 2, 3]));
        for chunk in [1, 3, 7, 100] {
            let (msgs, r) = decode_chunks(Limits::new(1024), &s, chunk);
            assert_eq!(r, Ok(Flow::Continue));
            assert_eq!(
                msgs,
                vec![
                    Owned::Ping(b"p".to_vec()),
                    Owned::Text("abcdef".into()),
                    Owned::Binary(vec![1, 2, 3])
                ]
            );
        }
    }

    #[test]
    fn extended_lengths_round_trip() {
        for len in [125usize, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let f = frame(true, OP_BINARY, &payload);
            let (msgs, r) = decode_chunks(Limits::new(1 << 20), &f, 4096);
            assert_eq!(r, Ok(Flow::Continue));
            assert_eq!(msgs, vec![Owned::Binary(payload)]);
        }
    }

    #[test]
    fn rejects_unmasked_client_frames() {
        let f = encode_frame(OP_TEXT, b"hi");
        let (_, r) = decode_chunks(Limits::new(1024), &f, 100);
        assert_eq!(r.unwrap_err().close_code, close::PROTOCOL_ERROR);
    }

    #[test]
    fn rejects_reserved_bits_and_opcodes() {
        let mut f = frame(true, OP_TEXT, b"hi");
        f[0] |= 0x40;
        assert_eq!(
            decode_chunks(Limits::new(64), &f, 100)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        for op in [3u8, 7, 0xB, 0xF] {
            let f = frame(true, op, b"");
            assert_eq!(
                decode_chunks(Limits::new(64), &f, 100)
                    .1
                    .unwrap_err()
                    .close_code,
                1002
            );
        }
    }

    #[test]
    fn enforces_frame_and_message_caps_before_buffering() {
        // The header alone announces 1 MiB: refused before a payload byte arrives.
        let mut hdr = BytesMut::new();
        put_header(&mut hdr, OP_BINARY, 1 << 20, Some(MASK));
        let (_, r) = decode_chunks(Limits::new(4096), &hdr, 100);
        assert_eq!(r.unwrap_err().close_code, close::MESSAGE_TOO_BIG);
        // A fragment bomb: small frames whose sum passes the message cap.
        let mut s = frame(false, OP_BINARY, &[0; 100]);
        for _ in 0..100 {
            s.extend(frame(false, OP_CONTINUATION, &[0; 100]));
        }
        let limits = Limits {
            max_frame: 4096,
            max_message: 1000,
        };
        let mut d = Decoder::new(Role::Server, limits);
        let r = d.feed(&mut s, &mut |_| Flow::Continue);
        assert_eq!(r.unwrap_err().close_code, close::MESSAGE_TOO_BIG);
        assert!(d.buffered() <= 1000 + 100, "buffered {}", d.buffered());
    }

    #[test]
    fn fails_fast_on_invalid_utf8_across_fragments() {
        let mut s = frame(false, OP_TEXT, "κόσμε".as_bytes());
        s.extend(frame(
            false,
            OP_CONTINUATION,
            &[
                0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xf4, 0x90, 0x80,
                0x80,
            ],
        ));
        s.extend(frame(true, OP_CONTINUATION, b"never reached"));
        let mut d = Decoder::new(Role::Server, Limits::new(1024));
        let mut seen = 0;
        let r = d.feed(&mut s, &mut |_| {
            seen += 1;
            Flow::Continue
        });
        assert_eq!(r.unwrap_err().close_code, close::INVALID_PAYLOAD);
        assert_eq!(seen, 0);
        // A code point split across fragments is fine.
        let bytes = "€".as_bytes();
        let mut s = frame(false, OP_TEXT, &bytes[..1]);
        s.extend(frame(true, OP_CONTINUATION, &bytes[1..]));
        let (msgs, r) = decode_chunks(Limits::new(64), &s, 1);
        assert_eq!(r, Ok(Flow::Continue));
        assert_eq!(msgs, vec![Owned::Text("€".into())]);
        // A message that ends inside a code point is not.
        let s = frame(true, OP_TEXT, &bytes[..2]);
        assert_eq!(
            decode_chunks(Limits::new(64), &s, 1)
                .1
                .unwrap_err()
                .close_code,
            1007
        );
    }

    #[test]
    fn validates_close_frames() {
        let ok = frame(true, OP_CLOSE, &close_payload(1000, "bye"));
        assert_eq!(
            decode_chunks(Limits::new(64), &ok, 3).0,
            vec![Owned::Close(Some((1000, "bye".into())))]
        );
        assert_eq!(
            decode_chunks(Limits::new(64), &frame(true, OP_CLOSE, b""), 3).0,
            vec![Owned::Close(None)]
        );
        let one = frame(true, OP_CLOSE, &[3]);
        assert_eq!(
            decode_chunks(Limits::new(64), &one, 3)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        let bad_code = frame(true, OP_CLOSE, &close_payload(1005, ""));
        assert_eq!(
            decode_chunks(Limits::new(64), &bad_code, 3)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        let mut bad_utf8 = 1000u16.to_be_bytes().to_vec();
        bad_utf8.extend([0xff, 0xfe]);
        let f = frame(true, OP_CLOSE, &bad_utf8);
        assert_eq!(
            decode_chunks(Limits::new(64), &f, 3)
                .1
                .unwrap_err()
                .close_code,
            1007
        );
    }

    #[test]
    fn control_frame_rules() {
        let long_ping = frame(true, OP_PING, &[0; 126]);
        assert_eq!(
            decode_chunks(Limits::new(4096), &long_ping, 50)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        let frag_ping = frame(false, OP_PING, b"x");
        assert_eq!(
            decode_chunks(Limits::new(4096), &frag_ping, 50)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        let cont = frame(true, OP_CONTINUATION, b"x");
        assert_eq!(
            decode_chunks(Limits::new(4096), &cont, 50)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
        let mut nested = frame(false, OP_TEXT, b"a");
        nested.extend(frame(true, OP_TEXT, b"b"));
        assert_eq!(
            decode_chunks(Limits::new(4096), &nested, 50)
                .1
                .unwrap_err()
                .close_code,
            1002
        );
    }

    #[test]
    fn stop_discards_the_rest() {
        let mut s = frame(true, OP_TEXT, b"a");
        s.extend(frame(true, OP_TEXT, b"b"));
        let mut d = Decoder::new(Role::Server, Limits::new(64));
        let mut n = 0;
        assert_eq!(
            d.feed(&mut s, &mut |_| {
                n += 1;
                Flow::Stop
            }),
            Ok(Flow::Stop)
        );
        assert_eq!(n, 1);
    }

    #[test]
    fn client_role_accepts_unmasked_and_rejects_masked() {
        let mut d = Decoder::new(Role::Client, Limits::new(64));
        let mut f = encode_close(1012, "restart").to_vec();
        let mut got = None;
        d.feed(&mut f, &mut |m| {
            got = Some(own(m));
            Flow::Continue
        })
        .unwrap();
        assert_eq!(got, Some(Owned::Close(Some((1012, "restart".into())))));
        let mut d = Decoder::new(Role::Client, Limits::new(64));
        let mut f = frame(true, OP_TEXT, b"x");
        assert!(d.feed(&mut f, &mut |_| Flow::Continue).is_err());
    }

    #[test]
    fn tracker_follows_boundaries() {
        let mut s = encode_frame(OP_TEXT, &[b'a'; 300]).to_vec();
        let first = s.len();
        s.extend_from_slice(&encode_close(1000, ""));
        let mut t = FrameTracker::new();
        t.observe(&s[..1]);
        assert_eq!(t.bytes_to_boundary(), None);
        t.observe(&s[1..5]);
        assert!(!t.at_boundary());
        assert_eq!(t.bytes_to_boundary(), Some((first - 5) as u64));
        t.observe(&s[5..first]);
        assert!(t.at_boundary());
        assert!(!t.close_seen());
        t.observe(&s[first..first + 1]);
        assert!(!t.at_boundary());
        t.observe(&s[first + 1..]);
        assert!(t.at_boundary());
        assert!(t.close_seen());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            chunk in 1usize..64,
            max in 0usize..300,
        ) {
            let mut d = Decoder::new(Role::Server, Limits { max_frame: max, max_message: max * 2 });
            let mut data = data;
            for piece in data.chunks_mut(chunk) {
                if d.feed(piece, &mut |_| Flow::Continue).is_err() {
                    break;
                }
            }
            prop_assert!(d.buffered() <= max * 2 + MAX_CONTROL_PAYLOAD + 64);
        }

        #[test]
        fn tracker_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64) {
            let mut t = FrameTracker::new();
            for piece in data.chunks(chunk) {
                t.observe(piece);
            }
        }

        #[test]
        fn any_split_of_valid_frames_decodes_the_same(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
            chunk in 1usize..200,
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend(frame(true, OP_BINARY, m));
            }
            let (out, r) = decode_chunks(Limits::new(1024), &stream, chunk);
            prop_assert_eq!(r, Ok(Flow::Continue));
            let expected: Vec<Owned> = msgs.into_iter().map(Owned::Binary).collect();
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn parse_header_agrees_with_encoder(
            len in prop_oneof![0usize..130, 65_530usize..65_540, 70_000usize..70_010],
            fin: bool,
            masked: bool,
            opcode in 0u8..16,
        ) {
            let mut out = BytesMut::new();
            let mask = masked.then_some(MASK);
            put_header_fin(&mut out, fin, opcode, len, mask);
            for cut in 0..out.len() {
                prop_assert_eq!(parse_header(&out[..cut]), None);
            }
            out.put_slice(b"payload");
            let h = parse_header(&out).unwrap();
            prop_assert_eq!(
                (h.fin, h.opcode, h.mask, h.header_len, h.payload_len),
                (fin, opcode, mask, out.len() - 7, len as u64)
            );
        }

        #[test]
        fn tracker_agrees_with_encoder(
            lens in proptest::collection::vec(0usize..70_000, 1..4),
            chunk in 1usize..5000,
        ) {
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            for len in &lens {
                stream.extend_from_slice(&encode_frame(OP_BINARY, &vec![0u8; *len]));
                ends.push(stream.len());
            }
            let mut t = FrameTracker::new();
            let mut pos = 0;
            while pos < stream.len() {
                let end = (pos + chunk).min(stream.len());
                t.observe(&stream[pos..end]);
                pos = end;
                prop_assert_eq!(t.at_boundary(), ends.contains(&pos));
            }
        }
    }
}
