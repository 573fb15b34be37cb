//! `cusedev::fuse::ioctl`: the `fuse_ioctl_in` a driver's call is made from, and the reply the
//! engine builds from the driver's answer, above all the FUSE_IOCTL_RETRY iovec lists.
//!
//! The reply is read back by a model of what the kernel does with it (fs/fuse/ioctl.c,
//! `fuse_do_ioctl`, Linux 6.1, 64-bit, protocol ≥ 7.16): a RETRY only for an unrestricted
//! ioctl (else EIO); at most FUSE_IOCTL_MAX_IOV iovecs each way and in all (else ENOMEM); a
//! body of exactly that many `fuse_ioctl_iovec`s (else EIO); per direction the lengths add up
//! to at most `max_pages` pages (`fuse_verify_ioctl_iov`, else ENOMEM); a buffer that wraps
//! faults when the kernel copies it (EFAULT). A final answer carries at most `out_size` bytes
//! (else EIO).
//!
//! Properties: what the engine sends, the kernel takes, and reads back exactly the buffers the
//! driver named (parse(encode(x)) == x), in order, input first; the only refusal left to the
//! kernel is ENOMEM for lists longer than its `max_pages` (the engine does not know them);
//! what the engine refuses (its `ReplyError`), the kernel would have refused too, each for its
//! own reason; a final answer is the driver's result and a prefix of its data, cut (and
//! reported cut) exactly when it is longer than `out_size`.

use arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use nix::errno::Errno;
use zerocopy::{FromBytes, IntoBytes};

use cusedev::device::{IoctlOutcome, IoctlReply, UserBuffer};
use cusedev::fuse::abi::{ioctl_flags, IoctlIn, IoctlIovec, IoctlOut};
use cusedev::fuse::ioctl::{self, ReplyError};
use cusedev::fuse::Reply;

/// `fc->max_pages` of a CUSE connection: `FUSE_DEFAULT_MAX_PAGES_PER_REQ` (fs/fuse/fuse_i.h,
/// 6.1), which cuse.c never raises.
const CUSE_MAX_PAGES: u64 = 32;
const PAGE_SIZE: u64 = 4096;

/// What the kernel makes of a reply body.
#[derive(Debug, PartialEq, Eq)]
enum KernelView {
    Retry(Vec<UserBuffer>, Vec<UserBuffer>),
    Done(i32, Vec<u8>),
}

fn kernel_reads(ioctl_in: &IoctlIn, body: &[u8]) -> Result<KernelView, Errno> {
    let (out, rest) = IoctlOut::read_from_prefix(body).map_err(|_| Errno::EIO)?;
    if out.flags & ioctl_flags::RETRY == 0 {
        if rest.len() > ioctl_in.out_size as usize {
            return Err(Errno::EIO);
        }
        return Ok(KernelView::Done(out.result, rest.to_vec()));
    }
    if ioctl_in.flags & ioctl_flags::UNRESTRICTED == 0 {
        return Err(Errno::EIO);
    }
    let max = ioctl_flags::MAX_IOV;
    if out.in_iovs > max || out.out_iovs > max || out.in_iovs + out.out_iovs > max {
        return Err(Errno::ENOMEM);
    }
    let count = (out.in_iovs + out.out_iovs) as usize;
    if rest.len() != count * size_of::<IoctlIovec>() {
        return Err(Errno::EIO);
    }
    let buffers: Vec<UserBuffer> = rest
        .chunks_exact(size_of::<IoctlIovec>())
        .map(|chunk| {
            let iov = IoctlIovec::read_from_bytes(chunk).expect("16 bytes");
            UserBuffer {
                addr: iov.base,
                len: iov.len,
            }
        })
        .collect();
    let (input, output) = buffers.split_at(out.in_iovs as usize);
    for list in [input, output] {
        let mut left = CUSE_MAX_PAGES * PAGE_SIZE;
        for buffer in list {
            if buffer.len > left {
                return Err(Errno::ENOMEM);
            }
            left -= buffer.len;
        }
    }
    if buffers.iter().any(|b| b.addr.checked_add(b.len).is_none()) {
        return Err(Errno::EFAULT);
    }
    Ok(KernelView::Retry(input.to_vec(), output.to_vec()))
}

/// The RETRY body as a server without any checks would send it.
fn naive_retry(input: &[UserBuffer], output: &[UserBuffer]) -> Vec<u8> {
    let out = IoctlOut {
        result: 0,
        flags: ioctl_flags::RETRY,
        in_iovs: input.len() as u32,
        out_iovs: output.len() as u32,
    };
    let mut body = out.as_bytes().to_vec();
    for b in input.iter().chain(output) {
        body.extend_from_slice(
            IoctlIovec {
                base: b.addr,
                len: b.len,
            }
            .as_bytes(),
        );
    }
    body
}

fn check(ioctl_in: &IoctlIn, outcome: IoctlOutcome) {
    let mut cut = None;
    let result = ioctl::reply(ioctl_in, outcome.clone(), |len| cut = Some(len));
    match (result, outcome) {
        (Ok(Reply::Data(body)), IoctlOutcome::Done(done)) => {
            let keep = done.out.len().min(ioctl_in.out_size as usize);
            let longer = done.out.len() > ioctl_in.out_size as usize;
            assert_eq!(
                cut,
                longer.then_some(done.out.len()),
                "cut reported exactly when cut"
            );
            assert_eq!(
                kernel_reads(ioctl_in, &body),
                Ok(KernelView::Done(done.result, done.out[..keep].to_vec()))
            );
        }
        (Ok(Reply::Data(body)), IoctlOutcome::Retry { input, output }) => {
            assert_eq!(cut, None);
            assert!(input.len() + output.len() <= ioctl_flags::MAX_IOV as usize);
            match kernel_reads(ioctl_in, &body) {
                Ok(view) => assert_eq!(view, KernelView::Retry(input, output)),
                Err(Errno::ENOMEM) => {
                    // Only because a direction asks for more than the kernel's pages.
                    let total =
                        |l: &[UserBuffer]| l.iter().map(|b| u128::from(b.len)).sum::<u128>();
                    let max = u128::from(CUSE_MAX_PAGES * PAGE_SIZE);
                    assert!(total(&input) > max || total(&output) > max);
                }
                Err(errno) => panic!("the kernel refuses the engine's RETRY with {errno}"),
            }
        }
        (Ok(other), _) => panic!("an ioctl answer became {other:?}"),
        (Err(err), IoctlOutcome::Done(_)) => panic!("a final answer refused: {err}"),
        (Err(err), IoctlOutcome::Retry { input, output }) => {
            let kernel = kernel_reads(ioctl_in, &naive_retry(&input, &output));
            let wraps = input
                .iter()
                .chain(&output)
                .any(|b| b.addr.checked_add(b.len).is_none());
            match err {
                ReplyError::RetryWhenRestricted => {
                    assert_eq!(ioctl_in.flags & ioctl_flags::UNRESTRICTED, 0);
                    assert_eq!(kernel, Err(Errno::EIO));
                }
                ReplyError::TooManyBuffers {
                    input: i,
                    output: o,
                } => {
                    assert_eq!((i, o), (input.len(), output.len()));
                    assert!(i + o > ioctl_flags::MAX_IOV as usize);
                    assert_eq!(kernel, Err(Errno::ENOMEM));
                }
                ReplyError::BufferWraps { addr, len } => {
                    assert!(wraps && addr.checked_add(len).is_none());
                    assert!(kernel.is_err(), "the kernel would take a wrapping buffer");
                }
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
enum AddrChoice {
    Low(u32),
    NearTop(u16),
    Any(u64),
}

fn address(choice: AddrChoice) -> u64 {
    match choice {
        AddrChoice::Low(a) => u64::from(a),
        AddrChoice::NearTop(d) => u64::MAX - u64::from(d),
        AddrChoice::Any(a) => a,
    }
}

/// A driver's buffer list: mostly a few buffers, sometimes more than the kernel takes (the
/// rest of a long list, once the input runs out, is one buffer after the other).
fn buffer_list(u: &mut Unstructured<'_>) -> ArbResult<Vec<UserBuffer>> {
    let n: u64 = if u.ratio(1, 8)? {
        u.int_in_range(0..=300)?
    } else {
        u.int_in_range(0..=8)?
    };
    let base = address(AddrChoice::arbitrary(u)?);
    let step = u64::from(u.int_in_range(0..=70_000u32)?);
    (0..n)
        .map(|i| {
            Ok(if u.is_empty() {
                UserBuffer {
                    addr: base.wrapping_add(i.wrapping_mul(step)),
                    len: step,
                }
            } else {
                UserBuffer {
                    addr: address(AddrChoice::arbitrary(u)?),
                    len: if u.ratio(1, 4)? {
                        u64::arbitrary(u)?
                    } else {
                        u64::from(u.int_in_range(0..=70_000u32)?)
                    },
                }
            })
        })
        .collect()
}

fn outcome(u: &mut Unstructured<'_>) -> ArbResult<IoctlOutcome> {
    Ok(if bool::arbitrary(u)? {
        let mut out = Vec::<u8>::arbitrary(u)?;
        out.truncate(8192);
        IoctlOutcome::Done(IoctlReply {
            result: i32::arbitrary(u)?,
            out,
        })
    } else {
        IoctlOutcome::Retry {
            input: buffer_list(u)?,
            output: buffer_list(u)?,
        }
    })
}

/// The body of `ioctl_retry`.
pub fn ioctl_retry(data: &[u8]) {
    // Raw: a fuse_ioctl_in, then its input; the driver's call must be exactly that.
    if let Ok((ioctl_in, rest)) = IoctlIn::read_from_prefix(data) {
        let input = &rest[..rest.len().min(ioctl_in.in_size as usize)];
        let call = ioctl::call(&ioctl_in, input);
        assert_eq!(
            (call.cmd, call.arg, call.out_size),
            (ioctl_in.cmd, ioctl_in.arg, ioctl_in.out_size)
        );
        assert_eq!(call.input, input);
        assert_eq!(
            call.unrestricted,
            ioctl_in.flags & ioctl_flags::UNRESTRICTED != 0
        );
        assert_eq!(call.compat, ioctl_in.flags & ioctl_flags::COMPAT != 0);
        // The rest as iovecs the driver asks for, split where its first byte says.
        let split = rest.first().map_or(0, |&b| usize::from(b));
        let buffers: Vec<UserBuffer> = rest
            .get(1..)
            .unwrap_or_default()
            .chunks_exact(16)
            .map(|c| {
                let iov = IoctlIovec::read_from_bytes(c).expect("16 bytes");
                UserBuffer {
                    addr: iov.base,
                    len: iov.len,
                }
            })
            .collect();
        let (i, o) = buffers.split_at(split.min(buffers.len()));
        check(
            &ioctl_in,
            IoctlOutcome::Retry {
                input: i.to_vec(),
                output: o.to_vec(),
            },
        );
        check(
            &ioctl_in,
            IoctlOutcome::Done(IoctlReply {
                result: ioctl_in.arg as i32,
                out: rest.to_vec(),
            }),
        );
    }

    let mut u = Unstructured::new(data);
    let _ = (|| -> ArbResult<()> {
        while !u.is_empty() {
            let flags = match u.int_in_range(0..=3)? {
                0 => ioctl_flags::UNRESTRICTED,
                1 => 0,
                2 => ioctl_flags::UNRESTRICTED | ioctl_flags::COMPAT,
                _ => u32::arbitrary(&mut u)?,
            };
            let ioctl_in = IoctlIn {
                fh: 1,
                flags,
                cmd: u32::arbitrary(&mut u)?,
                arg: u64::arbitrary(&mut u)?,
                in_size: 0,
                out_size: u32::from(u16::arbitrary(&mut u)?),
            };
            let outcome = outcome(&mut u)?;
            check(&ioctl_in, outcome);
        }
        Ok(())
    })();
}
