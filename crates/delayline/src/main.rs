//! `delayline`: one VM's network cable, with a one-way delay, for the local production
//! topology (`deploy/local/topo.py`) on kernels built without `tc netem`.
//!
//! It opens two TAP interfaces: `--vm-if` (the harness moves it into the VM's network
//! namespace and names it `eth0`) and `--bridge-if` (the harness makes it a port of the
//! topology's bridge). Every frame the VM sends is written to the bridge `--delay-us`
//! microseconds after it was read, in order; every frame the bridge sends towards the VM is
//! written to the VM at once. That is what `tc qdisc add dev eth0 root netem delay D` on each
//! VM gives: one-way latency D between any two VMs (each frame crosses one sender's cable),
//! RTT 2D. Frames waiting beyond `--limit` are dropped and counted, as netem's `limit` does.
//!
//! Not shipped: a test-harness tool. It prints `ready` on stdout once both interfaces exist,
//! and exits when either interface disappears (the VM's namespace deleted).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "A VM's network cable with a one-way delay (TAP pair), for deploy/local")]
struct Args {
    /// TAP interface towards the VM (moved into its namespace by the harness).
    #[arg(long)]
    vm_if: String,
    /// TAP interface towards the bridge.
    #[arg(long)]
    bridge_if: String,
    /// Delay of every frame from the VM to the bridge, in microseconds (0 = none).
    #[arg(long, default_value_t = 250)]
    delay_us: u64,
    /// Frames waiting at most; beyond it new frames are dropped and counted.
    #[arg(long, default_value_t = 10_000)]
    limit: usize,
}

/// Largest frame a TAP interface delivers without offloads (MTU 1500 + headers; 64 KiB
/// leaves room for a larger MTU).
const MAX_FRAME: usize = 65_536;

/// One thread: `ppoll` on both interfaces with a timeout of the oldest held frame's due
/// time (nanosecond precision), frames from the VM held for the delay, frames from the
/// bridge forwarded at once. A read failing (an interface gone) ends the process.
fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let vm = open_tap(&args.vm_if).with_context(|| format!("TAP interface {}", args.vm_if))?;
    let bridge =
        open_tap(&args.bridge_if).with_context(|| format!("TAP interface {}", args.bridge_if))?;
    exact_timers();
    println!("ready");
    io::stdout().flush()?;
    let delay = Duration::from_micros(args.delay_us);
    let mut line = Line::new(args.limit);
    let mut direct = Line::new(0);
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let timeout = line
            .next_due()
            .map(|due| due.saturating_duration_since(Instant::now()));
        let (vm_ready, bridge_ready) = wait_readable(&vm, &bridge, timeout)?;
        if vm_ready {
            for _ in 0..BATCH {
                let Some(n) = read_frame(&vm, &mut buf, &args.vm_if)? else {
                    break;
                };
                if delay.is_zero() {
                    direct.forward(&mut &bridge, &buf[..n]);
                } else {
                    line.hold(Instant::now() + delay, &buf[..n]);
                }
            }
        }
        if bridge_ready {
            for _ in 0..BATCH {
                let Some(n) = read_frame(&bridge, &mut buf, &args.bridge_if)? else {
                    break;
                };
                direct.forward(&mut &vm, &buf[..n]);
            }
        }
        line.release(Instant::now(), &mut &bridge);
    }
}

/// Frames read from one interface per wake-up before the other gets its turn.
const BATCH: usize = 64;

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
    /// interface is down (e.g. before the harness brings the VM's side up), and then the
    /// frame is lost, as on a cable without carrier.
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

/// One frame, `None` when none is waiting. An interface that went away (its namespace
/// was deleted) is an error, which ends the process.
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

/// Waits until either interface has a frame or `timeout` (None: no limit) passes; which
/// are readable. An error or hang-up on an interface counts as readable, so that the read
/// reports it.
#[allow(unsafe_code)]
fn wait_readable(
    vm: &File,
    bridge: &File,
    timeout: Option<Duration>,
) -> anyhow::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: vm.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: bridge.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is an array of two initialised pollfd structs that lives across the call,
    // `ts_ptr` is null or points at `ts`, which does too; no signal mask is passed.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(anyhow::Error::new(e).context("ppoll"));
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
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

    #[test]
    fn frames_leave_in_order_once_due_and_not_before() {
        let t = Instant::now();
        let at = |us| t + Duration::from_micros(us);
        let mut line = Line::new(10);
        let mut out = Frames::default();
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
    fn frames_beyond_the_limit_are_dropped_and_counted() {
        let t = Instant::now();
        let at = |us| t + Duration::from_micros(us);
        let mut line = Line::new(2);
        let mut out = Frames::default();
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
