//! FUSE_IOCTL: from `fuse_ioctl_in` to a driver's [`IoctlCall`], and from its
//! [`IoctlOutcome`] back to a `fuse_ioctl_out` reply.
//!
//! Two flavours reach us (fs/fuse/ioctl.c, `fuse_do_ioctl`, Linux 6.1):
//! - *restricted* (every FUSE mount): the kernel decodes `_IOC_DIR`/`_IOC_SIZE` of `cmd` itself,
//!   sends the input bytes along and copies at most `out_size` bytes back to `arg`. A server
//!   that answers FUSE_IOCTL_RETRY here gets nothing but EIO for its caller.
//! - *unrestricted* (CUSE with `CUSE_UNRESTRICTED_IOCTL`): the kernel knows nothing about the
//!   command. The first request carries no data; the server answers FUSE_IOCTL_RETRY with the
//!   list of caller buffers to read (`in_iovs`) and to write (`out_iovs`), and the kernel sends
//!   the request again with the input buffers' contents, as many rounds as the server wants.
//!   The answer's data is then scattered over the output buffers in order.

use zerocopy::IntoBytes;

use super::abi::{ioctl_flags, IoctlIn, IoctlIovec, IoctlOut};
use super::session::Reply;
use crate::device::{IoctlCall, IoctlOutcome, UserBuffer};

/// The call a driver sees for one FUSE_IOCTL request.
pub fn call<'a>(ioctl_in: &IoctlIn, input: &'a [u8]) -> IoctlCall<'a> {
    IoctlCall {
        cmd: ioctl_in.cmd,
        arg: ioctl_in.arg,
        input,
        out_size: ioctl_in.out_size,
        unrestricted: ioctl_in.flags & ioctl_flags::UNRESTRICTED != 0,
        compat: ioctl_in.flags & ioctl_flags::COMPAT != 0,
    }
}

/// Why a driver's answer cannot be sent as it is: a bug of our own device model, never the
/// caller's doing, so the caller of ioctl(2) gets EIO and the session logs it. Sent as it is,
/// the kernel would refuse each too (fs/fuse/ioctl.c `fuse_do_ioctl`, Linux 6.1): a retry on a
/// restricted ioctl with EIO, too many buffers with ENOMEM (and so, under CUSE, a direction
/// longer than `max_pages` pages: the fuzz target `ioctl_retry` models it, decision 52); a
/// wrapping buffer is longer than any request's pages, which `fuse_verify_ioctl_iov` refuses
/// with ENOMEM too.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    #[error("the driver asked for caller buffers on a restricted (FUSE mount) ioctl")]
    RetryWhenRestricted,
    #[error(
        "the driver asked for {input} input and {output} output buffers; the kernel takes at most {max} in all",
        max = ioctl_flags::MAX_IOV
    )]
    TooManyBuffers { input: usize, output: usize },
    #[error("a buffer of {len} bytes at {addr:#x} wraps around the address space")]
    BufferWraps { addr: u64, len: u64 },
}

/// The reply body for a driver's answer. `Done` data beyond `out_size` is cut (the kernel
/// would refuse the whole reply with EIO; cutting keeps the caller's syscall meaningful and
/// the session logs it).
pub fn reply(
    ioctl_in: &IoctlIn,
    outcome: IoctlOutcome,
    on_truncate: impl FnOnce(usize),
) -> Result<Reply, ReplyError> {
    match outcome {
        IoctlOutcome::Done(mut done) => {
            if done.out.len() > ioctl_in.out_size as usize {
                on_truncate(done.out.len());
                done.out.truncate(ioctl_in.out_size as usize);
            }
            let out = IoctlOut {
                result: done.result,
                flags: 0,
                in_iovs: 0,
                out_iovs: 0,
            };
            let mut body = out.as_bytes().to_vec();
            body.extend_from_slice(&done.out);
            Ok(Reply::Data(body))
        }
        IoctlOutcome::Retry { input, output } => {
            if ioctl_in.flags & ioctl_flags::UNRESTRICTED == 0 {
                return Err(ReplyError::RetryWhenRestricted);
            }
            if input.len() + output.len() > ioctl_flags::MAX_IOV as usize {
                return Err(ReplyError::TooManyBuffers {
                    input: input.len(),
                    output: output.len(),
                });
            }
            for buffer in input.iter().chain(&output) {
                if buffer.addr.checked_add(buffer.len).is_none() {
                    return Err(ReplyError::BufferWraps {
                        addr: buffer.addr,
                        len: buffer.len,
                    });
                }
            }
            // Both counts fit in u32: together they are at most MAX_IOV.
            let out = IoctlOut {
                result: 0,
                flags: ioctl_flags::RETRY,
                in_iovs: input.len() as u32,
                out_iovs: output.len() as u32,
            };
            let mut body = out.as_bytes().to_vec();
            for UserBuffer { addr, len } in input.iter().chain(&output) {
                body.extend_from_slice(
                    IoctlIovec {
                        base: *addr,
                        len: *len,
                    }
                    .as_bytes(),
                );
            }
            Ok(Reply::Data(body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::IoctlReply;
    use crate::fuse::abi::parse;

    fn unrestricted() -> IoctlIn {
        IoctlIn {
            fh: 1,
            flags: ioctl_flags::UNRESTRICTED,
            cmd: 0xc010_4d02,
            arg: 0x7fff_0000,
            ..IoctlIn::default()
        }
    }

    fn body(reply: Reply) -> Vec<u8> {
        match reply {
            Reply::Data(body) => body,
            _ => panic!("not a data reply"),
        }
    }

    #[test]
    fn call_carries_the_unrestricted_flag() {
        let restricted = IoctlIn::default();
        assert!(!call(&restricted, &[]).unrestricted);
        assert!(call(&unrestricted(), &[]).unrestricted);
    }

    #[test]
    fn retry_lists_input_then_output_iovecs() {
        let outcome = IoctlOutcome::Retry {
            input: vec![UserBuffer {
                addr: 0x7fff_0000,
                len: 16,
            }],
            output: vec![
                UserBuffer {
                    addr: 0x7fff_0000,
                    len: 16,
                },
                UserBuffer {
                    addr: 0x5000,
                    len: 4096,
                },
            ],
        };
        let body = body(reply(&unrestricted(), outcome, |_| {}).unwrap());
        assert_eq!(body.len(), 16 + 3 * 16);
        let (out, rest) = parse::<IoctlOut>(&body).unwrap();
        assert_eq!(
            (out.result, out.flags, out.in_iovs, out.out_iovs),
            (0, ioctl_flags::RETRY, 1, 2)
        );
        let (first, rest) = parse::<IoctlIovec>(rest).unwrap();
        let (_, rest) = parse::<IoctlIovec>(rest).unwrap();
        let (third, rest) = parse::<IoctlIovec>(rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!((first.base, first.len), (0x7fff_0000, 16));
        assert_eq!((third.base, third.len), (0x5000, 4096));
    }

    #[test]
    fn retry_on_a_restricted_ioctl_is_refused() {
        let outcome = IoctlOutcome::Retry {
            input: vec![],
            output: vec![],
        };
        assert_eq!(
            reply(&IoctlIn::default(), outcome, |_| {}).unwrap_err(),
            ReplyError::RetryWhenRestricted
        );
    }

    #[test]
    fn retry_with_more_than_max_iov_buffers_or_wrapping_is_refused() {
        let buffer = UserBuffer {
            addr: 0x1000,
            len: 1,
        };
        let outcome = IoctlOutcome::Retry {
            input: vec![buffer; 200],
            output: vec![buffer; 57],
        };
        assert!(matches!(
            reply(&unrestricted(), outcome, |_| {}),
            Err(ReplyError::TooManyBuffers {
                input: 200,
                output: 57
            })
        ));
        let outcome = IoctlOutcome::Retry {
            input: vec![UserBuffer {
                addr: u64::MAX - 1,
                len: 2,
            }],
            output: vec![],
        };
        assert!(matches!(
            reply(&unrestricted(), outcome, |_| {}),
            Err(ReplyError::BufferWraps { .. })
        ));
    }

    #[test]
    fn done_carries_result_and_data_cut_to_out_size() {
        let ioctl_in = IoctlIn {
            out_size: 4,
            ..unrestricted()
        };
        let mut cut_from = None;
        let outcome = IoctlOutcome::Done(IoctlReply {
            result: 7,
            out: b"abcdef".to_vec(),
        });
        let body = body(reply(&ioctl_in, outcome, |len| cut_from = Some(len)).unwrap());
        let (out, data) = parse::<IoctlOut>(&body).unwrap();
        assert_eq!((out.result, out.flags), (7, 0));
        assert_eq!(data, b"abcd");
        assert_eq!(cut_from, Some(6));
    }
}
