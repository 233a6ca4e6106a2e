//! `delayline`: the one-way delay of one VM's link, for the local production topology
//! (`deploy/local/topo.py`) on kernels built without `tc netem`.
//!
//! The VM keeps its veth link to the bridge. A `tc` filter on the bridge side of that link
//! redirects every frame the VM sends to a TAP interface instead of the bridge; this process
//! reads each from the TAP interface and writes it back `--delay-us` microseconds later, in
//! order — written to a TAP interface, a frame enters the bridge (the TAP interface is a
//! port of it) and is forwarded as if it had come from the VM. Frames towards the VM never
//! pass here. That is what `tc qdisc add dev eth0 root netem delay D` on each VM gives:
//! one-way latency D between any two VMs (each frame is delayed once, at its sender), RTT 2D.
//! Frames waiting beyond `--limit` are dropped and counted, as netem's `limit` does.
//!
//! Not shipped: a test-harness tool. It prints `ready` on stdout once the interface exists,
//! and exits when the interface disappears.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Delays every frame a VM sends (TAP), for deploy/local")]
struct Args {
    /// TAP interface that the VM's frames are redirected to (tc mirred) and that writes
    /// them, delayed, into the bridge (a port of it).
    #[arg(long)]
    tap: String,
    /// The VM's MAC address: frames from any other source are dropped (a safety net
    /// against loops; the bridge floods nothing to the TAP port).
    #[arg(long, value_parser = parse_mac)]
    vm_mac: [u8; 6],
    /// Delay of every frame, in microseconds (0 = none).
    #[arg(long, default_value_t = 250)]
    delay_us: u64,
    /// Frames waiting at most; beyond it new frames are dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
}

/// Largest frame a TAP interface delivers without offloads (MTU 1500 + headers; 64 KiB
/// leaves room for a larger MTU).
const MAX_FRAME: usize = 65_536;
/// Frames read per wake-up before the due ones are written.
const BATCH: usize = 64;

/// One thread: `ppoll` on the TAP interface with a timeout of the oldest held frame's due
/// time (nanosecond precision); each frame read is written back to the same interface (into
/// the bridge) `delay` later. A read failing (the interface gone) ends the process.
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tap = open_tap(&args.tap).with_context(|| format!("TAP interface {}", args.tap))?;
    exact_timers();
    println!("ready");
    io::stdout().flush()?;
    let delay = Duration::from_micros(args.delay_us);
    let mut line = Line::new(args.limit);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut foreign = 0u64;
    loop {
        let timeout = line
            .next_due()
            .map(|due| due.saturating_duration_since(Instant::now()));
        if wait_readable(&tap, timeout)? {
            for _ in 0..BATCH {
                let Some(n) = read_frame(&tap, &mut buf, &args.tap)? else {
                    break;
                };
                if !from_vm(&buf[..n], &args.vm_mac) {
                    foreign += 1;
                    if foreign == 1 || foreign % 10_000 == 0 {
                        eprintln!("delayline: {foreign} frame(s) not from the VM dropped");
                    }
                    continue;
                }
                line.hold(Instant::now() + delay, &buf[..n]);
            }
        }
        line.release(Instant::now(), &mut &tap);
    }
}

/// Whether an Ethernet frame's source address is the VM's.
fn from_vm(frame: &[u8], vm_mac: &[u8; 6]) -> bool {
    frame.get(6..12) == Some(&vm_mac[..])
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s}: expected six hex bytes separated by ':'"));
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16).map_err(|e| format!("{s}: {e}"))?;
    }
    Ok(mac)
}

/// The frames in flight from the VM to the bridge, oldest first (one delay for all, so
/// arrival order is due order), and the buffers of frames already sent, for reuse.
#[derive(Debug)]
struct Line {
    queue: VecDeque<(Instant, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
    limit: usize,
    dropped: u64,
    write_errors: u64,
}

impl Line {
    fn new(limit: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            spare: Vec::new(),
            limit,
            dropped: 0,
            write_errors: 0,
        }
    }

    fn hold(&mut self, due: Instant, frame: &[u8]) {
        if self.queue.len() >= self.limit {
            self.dropped += 1;
            if self.dropped == 1 || self.dropped % 10_000 == 0 {
                eprintln!(
                    "delayline: {} frame(s) dropped, more than {} waiting",
                    self.dropped, self.limit
                );
            }
            return;
        }
        let mut copy = self.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(frame);
        self.queue.push_back((due, copy));
    }

    fn release(&mut self, now: Instant, out: &mut impl Write) {
        while self.queue.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, frame)) = self.queue.pop_front() {
                self.forward(out, &frame);
                if self.spare.len() < 1_024 {
                    self.spare.push(frame);
                }
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// A write to a TAP interface injects one frame whole; it fails only while the
    /// interface is down (before the harness brings it up), and then the frame is lost, as
    /// on a cable without carrier.
    fn forward(&mut self, out: &mut impl Write, frame: &[u8]) {
        if out.write(frame).is_err() {
            self.write_errors += 1;
            if self.write_errors == 1 || self.write_errors % 10_000 == 0 {
                eprintln!(
                    "delayline: {} frame(s) not written (interface down)",
                    self.write_errors
                );
            }
        }
    }
}

/// One frame, `None` when none is waiting. An interface that went away (deleted) is an
/// error, which ends the process.
fn read_frame(mut tap: &File, buf: &mut [u8], name: &str) -> anyhow::Result<Option<usize>> {
    loop {
        match tap.read(buf) {
            Ok(0) => bail!("{name}: interface gone"),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("{name}: read"))),
        }
    }
}

/// Waits until the interface has a frame or `timeout` (None: no limit) passes; whether it
/// is readable. An error or hang-up counts as readable, so that the read reports it.
#[allow(unsafe_code)]
fn wait_readable(tap: &File, timeout: Option<Duration>) -> anyhow::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: tap.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is an initialised pollfd array that lives across the call, `ts_ptr` is
    // null or points at `ts`, which does too; no signal mask is passed.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 1, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(anyhow::Error::new(e).context("ppoll"));
    }
    Ok(fds[0].revents != 0)
}

/// Timed waits of this process end when due, not up to 50 µs later (Linux's default timer
/// slack, which would add to every frame's delay).
#[allow(unsafe_code)]
fn exact_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if rc != 0 {
        eprintln!(
            "delayline: PR_SET_TIMERSLACK failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// Opens `/dev/net/tun` non-blocking and attaches it to the TAP interface `name` (created
/// if absent; it lives while this descriptor is open). Frames carry no packet-information
/// header and no offloads, so the kernel hands over whole Ethernet frames with checksums.
#[allow(unsafe_code)]
fn open_tap(name: &str) -> anyhow::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("interface name must be 1-{} bytes", libc::IFNAMSIZ - 1);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("open /dev/net/tun (is the tun driver available?)")?;
    // SAFETY: `ifreq` is plain old data for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, on a descriptor
    // of /dev/net/tun that `file` keeps open for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(anyhow::Error::new(io::Error::last_os_error()).context("ioctl TUNSETIFF"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects frames as separate writes, like a TAP interface.
    #[derive(Debug, Default)]
    struct Frames(Vec<Vec<u8>>);

    impl Write for Frames {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A line holding at most `limit` frames, an output, and a clock: `at(us)` is `us`
    /// microseconds after one fixed instant.
    fn setup(limit: usize) -> (Line, Frames, impl Fn(u64) -> Instant) {
        let t = Instant::now();
        (Line::new(limit), Frames::default(), move |us| {
            t + Duration::from_micros(us)
        })
    }

    #[test]
    fn frames_leave_in_order_once_due_and_not_before() {
        let (mut line, mut out, at) = setup(10);
        line.hold(at(1_000), b"first");
        line.hold(at(1_500), b"second");
        line.release(at(999), &mut out);
        assert!(out.0.is_empty(), "nothing is due before its time");
        assert_eq!(line.next_due(), Some(at(1_000)));
        line.release(at(1_200), &mut out);
        assert_eq!(out.0, vec![b"first".to_vec()]);
        assert_eq!(line.next_due(), Some(at(1_500)));
        line.release(at(5_000), &mut out);
        assert_eq!(out.0, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(line.next_due(), None);
    }

    #[test]
    fn only_the_vm_s_frames_pass_and_macs_parse() {
        let mac = parse_mac("02:00:0a:d5:01:0a").unwrap_or_default();
        assert_eq!(mac, [0x02, 0x00, 0x0a, 0xd5, 0x01, 0x0a]);
        assert!(parse_mac("02:00:0a:d5:01").is_err());
        assert!(parse_mac("02:00:0a:d5:01:zz").is_err());
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1]);
        assert!(from_vm(&frame, &mac));
        frame[11] = 0x0b;
        assert!(!from_vm(&frame, &mac));
        assert!(!from_vm(&frame[..10], &mac), "a runt frame is not the VM's");
    }

    #[test]
    fn frames_beyond_the_limit_are_dropped_and_counted() {
        let (mut line, mut out, at) = setup(2);
        for (i, frame) in [b"a", b"b", b"c"].iter().enumerate() {
            line.hold(at(i as u64), *frame);
        }
        assert_eq!(line.dropped, 1);
        line.release(at(10), &mut out);
        assert_eq!(out.0, vec![b"a".to_vec(), b"b".to_vec()]);
        // Buffers are reused without leaking a previous frame's bytes.
        line.hold(at(20), b"longer frame");
        line.hold(at(21), b"x");
        line.release(at(30), &mut out);
        assert_eq!(out.0[2..], [b"longer frame".to_vec(), b"x".to_vec()]);
    }
}
