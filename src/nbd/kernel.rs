//! Attaching a bdev to the kernel's nbd driver as `/dev/nbdX` (`nbd_start_disk`).
//!
//! blockd serves one end of a `socketpair` with a [`super::conn::Conn`] in transmission
//! mode (the kernel skips negotiation and uses simple replies) and hands the other end to
//! the kernel with the generic-netlink family "nbd" (`include/uapi/linux/nbd-netlink.h`):
//! `NBD_CMD_CONNECT` with the size, block size, transmission flags and the socket;
//! `NBD_CMD_DISCONNECT` detaches. The messages are built by pure functions, tested
//! byte for byte.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::error::Error;

/// Errno and message when the kernel has no nbd driver.
pub fn unavailable() -> Error {
    Error::new(
        libc::ENODEV,
        "kernel nbd support is not available (modprobe nbd); export over a socket with \
         nbd_export_add instead",
    )
}

/// Whether the nbd driver is loaded (or built in).
pub fn kernel_available() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/sys/block/nbd0").exists()
}

/// Parses `/dev/nbdN` into N.
pub fn device_index(dev: &str) -> Option<u32> {
    let n = dev.strip_prefix("/dev/nbd")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 6 {
        return None;
    }
    n.parse().ok()
}

// Generic netlink constants (linux/netlink.h, linux/genetlink.h).
const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

// nbd-netlink.h.
/// Family name of the nbd driver.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Appends a netlink attribute (length includes the 4-byte header; padded to 4).
fn attr(out: &mut Vec<u8>, typ: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&typ.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A netlink + genetlink header followed by `attrs`.
fn genl_msg(family: u16, flags: u16, seq: u32, cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&family.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    v.extend_from_slice(&[cmd, version, 0, 0]);
    v.extend_from_slice(attrs);
    v
}

/// `CTRL_CMD_GETFAMILY` for `name` (resolves the family id).
pub fn getfamily_msg(seq: u32, name: &str) -> Vec<u8> {
    let mut a = Vec::new();
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    attr(&mut a, CTRL_ATTR_FAMILY_NAME, &n);
    genl_msg(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        &a,
    )
}

/// What `NBD_CMD_CONNECT` carries.
#[derive(Clone, Copy, Debug)]
pub struct ConnectParams {
    /// Device index, or None to let the kernel pick a free one.
    pub index: Option<u32>,
    pub size_bytes: u64,
    pub block_size: u64,
    /// Transmission flags (NBD_FLAG_*), as the kernel's `NBD_ATTR_SERVER_FLAGS`.
    pub server_flags: u64,
    /// Request timeout in seconds.
    pub timeout: u64,
    pub sock_fd: RawFd,
}

/// `NBD_CMD_CONNECT` for family id `family`.
pub fn connect_msg(family: u16, seq: u32, p: &ConnectParams) -> Vec<u8> {
    let mut a = Vec::new();
    if let Some(i) = p.index {
        attr(&mut a, NBD_ATTR_INDEX, &i.to_ne_bytes());
    }
    attr(&mut a, NBD_ATTR_SIZE_BYTES, &p.size_bytes.to_ne_bytes());
    attr(
        &mut a,
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &p.block_size.to_ne_bytes(),
    );
    attr(&mut a, NBD_ATTR_TIMEOUT, &p.timeout.to_ne_bytes());
    attr(&mut a, NBD_ATTR_SERVER_FLAGS, &p.server_flags.to_ne_bytes());
    let mut fd = Vec::new();
    attr(&mut fd, NBD_SOCK_FD, &(p.sock_fd as u32).to_ne_bytes());
    let mut item = Vec::new();
    attr(&mut item, NBD_SOCK_ITEM | NLA_F_NESTED, &fd);
    attr(&mut a, NBD_ATTR_SOCKETS | NLA_F_NESTED, &item);
    genl_msg(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
        &a,
    )
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn disconnect_msg(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut a = Vec::new();
    attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
    genl_msg(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
        &a,
    )
}

/// Attributes `(type, payload)` of a genetlink message body (after the 20 header bytes).
fn parse_attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let typ = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        v.push((typ, &b[4..len]));
        let adv = len.div_ceil(4) * 4;
        b = &b[adv.min(b.len())..];
    }
    v
}

/// The outcome of one request: the attributes of the reply (if any) once acked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub attrs: Vec<(u16, Vec<u8>)>,
}

/// Parses the datagrams answered to request `seq`: Ok(Some) once the ACK arrived,
/// Err(errno) on an error message.
pub fn parse_reply(buf: &[u8], seq: u32, acc: &mut Reply) -> Result<bool, i32> {
    let mut b = buf;
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let typ = u16::from_ne_bytes([b[4], b[5]]);
        let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        if len < 16 || len > b.len() {
            return Err(libc::EPROTO);
        }
        let m = &b[..len];
        if mseq == seq {
            if typ == NLMSG_ERROR {
                if m.len() < 20 {
                    return Err(libc::EPROTO);
                }
                let err = i32::from_ne_bytes([m[16], m[17], m[18], m[19]]);
                if err != 0 {
                    return Err(-err);
                }
                return Ok(true);
            }
            if m.len() >= 20 {
                for (t, p) in parse_attrs(&m[20..]) {
                    acc.attrs.push((t, p.to_vec()));
                }
            }
        }
        let adv = len.div_ceil(4) * 4;
        b = &b[adv.min(b.len())..];
    }
    Ok(false)
}

/// A generic-netlink socket.
pub struct Genl {
    fd: OwnedFd,
    seq: u32,
}

impl Genl {
    pub fn open() -> std::io::Result<Genl> {
        // SAFETY: plain socket(2); the result is checked and owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a valid timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Genl { fd, seq: 1 })
    }

    /// Sends a message built for the next sequence number and waits for its ACK.
    pub fn request(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> std::io::Result<Reply> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = build(seq);
        // SAFETY: sockaddr_nl zeroed = the kernel; msg is a valid buffer.
        let r = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut acc = Reply::default();
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: recv into our buffer.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            match parse_reply(&buf[..n as usize], seq, &mut acc) {
                Ok(true) => return Ok(acc),
                Ok(false) => continue,
                Err(e) => return Err(std::io::Error::from_raw_os_error(e)),
            }
        }
    }

    /// The id of generic-netlink family `name`.
    pub fn family(&mut self, name: &str) -> std::io::Result<u16> {
        let r = self.request(|seq| getfamily_msg(seq, name))?;
        r.attrs
            .iter()
            .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// `NBD_CMD_CONNECT`; returns the device index the kernel used.
    pub fn nbd_connect(&mut self, family: u16, p: &ConnectParams) -> std::io::Result<u32> {
        let r = self.request(|seq| connect_msg(family, seq, p))?;
        r.attrs
            .iter()
            .find(|(t, pl)| *t == NBD_ATTR_INDEX && pl.len() >= 4)
            .map(|(_, pl)| u32::from_ne_bytes([pl[0], pl[1], pl[2], pl[3]]))
            .or(p.index)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EPROTO))
    }

    /// `NBD_CMD_DISCONNECT`.
    pub fn nbd_disconnect(&mut self, family: u16, index: u32) -> std::io::Result<()> {
        self.request(|seq| disconnect_msg(family, seq, index))
            .map(|_| ())
    }
}

/// A `socketpair(AF_UNIX, SOCK_STREAM)`: (blockd's end, the kernel's end).
pub fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(x: u16) -> [u8; 2] {
        x.to_ne_bytes()
    }

    #[test]
    fn device_names() {
        assert_eq!(device_index("/dev/nbd0"), Some(0));
        assert_eq!(device_index("/dev/nbd15"), Some(15));
        assert_eq!(device_index("/dev/nbd"), None);
        assert_eq!(device_index("/dev/nbd1p1"), None);
        assert_eq!(device_index("/dev/sda"), None);
    }

    #[test]
    fn getfamily_bytes() {
        let m = getfamily_msg(7, "nbd");
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes()); // 16 + 4 + 8
        want.extend_from_slice(&ne16(0x10));
        want.extend_from_slice(&ne16(NLM_F_REQUEST | NLM_F_ACK));
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[3, 1, 0, 0]);
        want.extend_from_slice(&ne16(8)); // "nbd\0" + header
        want.extend_from_slice(&ne16(2));
        want.extend_from_slice(b"nbd\0");
        assert_eq!(m, want);
    }

    #[test]
    fn connect_bytes() {
        let p = ConnectParams {
            index: Some(3),
            size_bytes: 1 << 20,
            block_size: 512,
            server_flags: 0x15d,
            timeout: 30,
            sock_fd: 9,
        };
        let m = connect_msg(0x22, 5, &p);
        let mut a = Vec::new();
        // index (u32)
        a.extend_from_slice(&ne16(8));
        a.extend_from_slice(&ne16(1));
        a.extend_from_slice(&3u32.to_ne_bytes());
        for (t, v) in [(2u16, 1u64 << 20), (3, 512), (4, 30), (5, 0x15d)] {
            a.extend_from_slice(&ne16(12));
            a.extend_from_slice(&ne16(t));
            a.extend_from_slice(&v.to_ne_bytes());
        }
        // SOCKETS { ITEM { FD } }
        a.extend_from_slice(&ne16(16));
        a.extend_from_slice(&ne16(7 | NLA_F_NESTED));
        a.extend_from_slice(&ne16(12));
        a.extend_from_slice(&ne16(1 | NLA_F_NESTED));
        a.extend_from_slice(&ne16(8));
        a.extend_from_slice(&ne16(1));
        a.extend_from_slice(&9u32.to_ne_bytes());
        assert_eq!(&m[..4], &((20 + a.len()) as u32).to_ne_bytes());
        assert_eq!(&m[4..6], &ne16(0x22));
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, 1, 0, 0]);
        assert_eq!(&m[20..], &a[..]);

        let d = disconnect_msg(0x22, 6, 3);
        assert_eq!(d.len(), 28);
        assert_eq!(&d[16..20], &[NBD_CMD_DISCONNECT, 1, 0, 0]);
        assert_eq!(
            &d[20..],
            &[&ne16(8)[..], &ne16(1), &3u32.to_ne_bytes()].concat()
        );
    }

    #[test]
    fn replies() {
        // A genl reply carrying NBD_ATTR_INDEX = 4, then an ACK.
        let mut a = Vec::new();
        attr(&mut a, NBD_ATTR_INDEX, &4u32.to_ne_bytes());
        let mut msg = genl_msg(0x22, 0, 9, NBD_CMD_CONNECT, 1, &a);
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&ne16(NLMSG_ERROR));
        ack.extend_from_slice(&ne16(0));
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        let mut acc = Reply::default();
        assert_eq!(parse_reply(&msg, 9, &mut acc), Ok(false));
        assert_eq!(
            acc.attrs,
            vec![(NBD_ATTR_INDEX, 4u32.to_ne_bytes().to_vec())]
        );
        assert_eq!(parse_reply(&ack, 9, &mut acc), Ok(true));
        // An error ack: -EBUSY.
        ack[16..20].copy_from_slice(&(-libc::EBUSY).to_ne_bytes());
        assert_eq!(parse_reply(&ack, 9, &mut acc), Err(libc::EBUSY));
        // Garbage lengths do not panic.
        msg[0] = 0xff;
        assert!(parse_reply(&msg, 9, &mut acc).is_err());
        assert_eq!(parse_reply(&[1, 2, 3], 9, &mut acc), Ok(false));
    }
}
