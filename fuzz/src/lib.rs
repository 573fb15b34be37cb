//! The bodies of the fuzz targets, one public function per target: the vmbus wire parsers
//! here, the cusedev engine in [`engine`], its ioctl retry lists in [`ioctl_retry`], vhost's
//! descriptor chains and vsock device in [`vhost`].
//!
//! Each `fuzz_targets/<name>.rs` only calls the function of the same name, so the same code
//! runs under libFuzzer (`make fuzz`) and under a plain `cargo test` that replays the committed
//! corpus (`tests/corpus.rs`). Every function feeds the input to the crate's public parsers as
//! raw bytes and, where a parse succeeds, checks a property that can fail (re-encoding gives
//! the same message back, lengths stay within their bounds, strings have no NUL, ...). The
//! same bytes are also read structurally (`arbitrary`) to build valid messages with the
//! encoders, which must parse back to what was encoded: raw bytes alone would rarely get past
//! the first length or magic check of a 7432-byte KVP message.
//!
//! A failed property panics, which libFuzzer reports as a crash.

use arbitrary::{Arbitrary, Result as ArbResult, Unstructured};

use vmbus::ic::{IcVersion, ICMSG_HDR_LEN};

pub mod engine;
pub mod ioctl_retry;
pub mod vhost;

pub use ioctl_retry::ioctl_retry;
pub use vhost::{vhost_chain, vsock_device};

use engine::{Mode, Personality};

/// Runs `f` over the input read structurally; running out of bytes just ends it.
fn structured(data: &[u8], f: impl FnOnce(&mut Unstructured<'_>) -> ArbResult<()>) {
    let mut u = Unstructured::new(data);
    let _ = f(&mut u);
}

fn versions(u: &mut Unstructured<'_>, max: usize) -> ArbResult<Vec<IcVersion>> {
    let n = u.int_in_range(0..=max)?;
    (0..n)
        .map(|_| {
            // Small numbers, so that host and guest lists meet often.
            Ok(IcVersion::new(
                u.int_in_range(0..=5)?,
                u.int_in_range(0..=2)?,
            ))
        })
        .collect()
}

/// A string of at most `max` chars.
fn text(u: &mut Unstructured<'_>, max: usize) -> ArbResult<String> {
    let s = String::arbitrary(u)?;
    Ok(s.chars().take(max).collect())
}

/// `vmbus::stream`: a buffer of bus frames as a stream reader sees it, and HELLO.
pub fn stream(data: &[u8]) {
    use vmbus::stream::{decode_frame, encode_frame, kind, FrameHeader, Hello, Role};
    use vmbus::stream::{FRAME_HEADER_LEN, HELLO_LEN, MAX_FRAME_BODY};

    if let Ok(h) = FrameHeader::parse(data) {
        assert!(h.len as usize <= MAX_FRAME_BODY);
        assert_eq!(&h.encode()[..], &data[..FRAME_HEADER_LEN]);
    }
    if let Ok(hello) = Hello::parse(data) {
        assert_eq!(data.len(), HELLO_LEN);
        assert_eq!(hello.encode(), data);
    }
    let mut buf = data;
    while let Ok(Some(frame)) = decode_frame(buf) {
        assert_eq!(frame.consumed, FRAME_HEADER_LEN + frame.header.len as usize);
        assert!(frame.consumed <= buf.len());
        assert_eq!(
            encode_frame(frame.header.kind, frame.body),
            &buf[..frame.consumed]
        );
        if frame.header.kind == kind::HELLO {
            if let Ok(hello) = Hello::parse(frame.body) {
                assert_eq!(hello.encode(), frame.body);
            }
        }
        buf = &buf[frame.consumed..];
    }

    structured(data, |u| {
        let k = *u.choose(&[kind::HELLO, kind::CONTROL, kind::PACKET, kind::MEMORY])?;
        let body = Vec::<u8>::arbitrary(u)?;
        let cut = u.int_in_range(0..=body.len() + FRAME_HEADER_LEN - 1)?;
        let wire = encode_frame(k, &body);
        let frame = decode_frame(&wire)
            .expect("own frame")
            .expect("whole frame");
        assert_eq!((frame.header.kind, frame.body), (k, &body[..]));
        assert_eq!(frame.consumed, wire.len());
        // A strict prefix is "need more bytes", never an error or a frame.
        assert_eq!(decode_frame(&wire[..cut]), Ok(None));
        let hello = if bool::arbitrary(u)? {
            Hello::control()
        } else {
            Hello::channel(u32::arbitrary(u)?, u32::arbitrary(u)?)
        };
        let parsed = Hello::parse(&hello.encode()).expect("own HELLO");
        assert_eq!(parsed, hello);
        assert!(matches!(parsed.role, Role::Control | Role::Channel));
        Ok(())
    });
}

/// `vmbus::channel_msg`: channel-management messages.
pub fn channel_msg(data: &[u8]) {
    use vmbus::channel_msg::ChannelMessage;
    use vmbus::guid::Guid;

    if let Ok(m) = ChannelMessage::parse(data) {
        let wire = m.encode();
        assert_eq!(wire.len(), data.len(), "{m:?}");
        assert_eq!(&wire[..4], &data[..4]);
        assert_eq!(ChannelMessage::parse(&wire), Ok(m));
    }

    structured(data, |u| {
        let (a, b, c) = (u32::arbitrary(u)?, u32::arbitrary(u)?, u32::arbitrary(u)?);
        let m = match u.int_in_range(0..=9)? {
            0 => ChannelMessage::InitiateContact { version: a },
            1 => ChannelMessage::VersionResponse {
                supported: bool::arbitrary(u)?,
                conn_id: a,
            },
            2 => ChannelMessage::RequestOffers,
            3 => ChannelMessage::Offer {
                if_type: Guid(<[u8; 16]>::arbitrary(u)?),
                if_instance: Guid(<[u8; 16]>::arbitrary(u)?),
                child_relid: a,
                connection_id: b,
            },
            4 => ChannelMessage::AllOffersDelivered,
            5 => ChannelMessage::OpenChannel {
                child_relid: a,
                open_id: b,
            },
            6 => ChannelMessage::OpenResult {
                child_relid: a,
                open_id: b,
                status: c,
            },
            7 => ChannelMessage::Rescind { child_relid: a },
            8 => ChannelMessage::CloseChannel { child_relid: a },
            _ => ChannelMessage::RelidReleased { child_relid: a },
        };
        let wire = m.encode();
        assert_eq!(ChannelMessage::parse(&wire), Ok(m));
        assert!(ChannelMessage::parse(&wire[..wire.len() - 1]).is_err());
        Ok(())
    });
}

/// `vmbus::packet`: VMBus packet descriptors.
pub fn packet(data: &[u8]) {
    use vmbus::packet::{encode_packet, parse_packet, DESCRIPTOR_LEN, MAX_INBAND_PAYLOAD};

    if let Ok(p) = parse_packet(data) {
        assert_eq!(p.bytes, data);
        let offset8 = u16::from_le_bytes([data[2], data[3]]) as usize;
        assert!(offset8 * 8 >= DESCRIPTOR_LEN);
        assert_eq!(p.payload.len(), data.len() - offset8 * 8);
        assert_eq!(data.len() % 8, 0);
        if offset8 * 8 == DESCRIPTOR_LEN {
            assert_eq!(encode_packet(p.ty, p.trans_id, p.flags, p.payload), data);
        }
    }

    structured(data, |u| {
        let (ty, trans_id, flags) = (u16::arbitrary(u)?, u64::arbitrary(u)?, u16::arbitrary(u)?);
        let payload = Vec::<u8>::arbitrary(u)?;
        let wire = encode_packet(ty, trans_id, flags, &payload);
        assert!(payload.len() <= MAX_INBAND_PAYLOAD);
        let p = parse_packet(&wire).expect("own packet");
        assert_eq!((p.ty, p.trans_id, p.flags), (ty, trans_id, flags));
        assert_eq!(&p.payload[..payload.len()], &payload[..]);
        assert!(p.payload.len() - payload.len() < 8);
        assert!(p.payload[payload.len()..].iter().all(|&b| b == 0));
        Ok(())
    });
}

/// `vmbus::ic` and `vmbus::negotiate`: IC headers and version negotiation, both the guest's
/// in-place answer (6.1 and 3.x rules) and the host's reading of it.
pub fn ic_negotiate(data: &[u8]) {
    use vmbus::ic::{ic_header, msgtype, pipe_header, set_reply, PIPE_HDR_LEN};
    use vmbus::negotiate::{
        build_request_packet, parse_response, prep_negotiate_resp, prep_negotiate_resp_v3,
        KVP_FW_VERSIONS, KVP_SRV_VERSIONS, MAX_VER_COUNT,
    };

    assert_eq!(pipe_header(data).is_ok(), data.len() >= PIPE_HDR_LEN);
    let hdr = ic_header(data);
    assert_eq!(hdr.is_ok(), data.len() >= ICMSG_HDR_LEN);
    if let Ok(Some((fw, srv))) = parse_response(data) {
        let _ = (fw.to_u32(), srv.to_u32());
    }
    let is_negotiate = hdr.map(|h| h.icmsgtype.get() == msgtype::NEGOTIATE);
    for v3 in [false, true] {
        let mut buf = data.to_vec();
        let chosen = if v3 {
            prep_negotiate_resp_v3(&mut buf, KVP_FW_VERSIONS, KVP_SRV_VERSIONS)
        } else {
            prep_negotiate_resp(&mut buf, KVP_FW_VERSIONS, KVP_SRV_VERSIONS)
        };
        assert_eq!(buf.len(), data.len());
        assert_eq!(
            &buf[..ICMSG_HDR_LEN.min(buf.len())],
            {
                // Only icmsgsize (bytes 8 + 10..12 of icmsg_hdr) may change in the headers.
                let mut want = data[..ICMSG_HDR_LEN.min(data.len())].to_vec();
                // The 6.1 rule refuses a buffer without room for the counts before writing.
                let at = PIPE_HDR_LEN + 10;
                let writes = v3 || data.len() >= ICMSG_HDR_LEN + 4;
                for (i, b) in 0x10u16
                    .to_le_bytes()
                    .into_iter()
                    .enumerate()
                    .filter(|_| writes)
                {
                    if let Some(slot) = want.get_mut(at + i) {
                        *slot = b;
                    }
                }
                want
            }
            .as_slice()
        );
        if let Some((fw, srv)) = chosen {
            assert!(KVP_FW_VERSIONS.contains(&fw) && KVP_SRV_VERSIONS.contains(&srv));
        }
        if is_negotiate == Ok(true) && buf.len() >= ICMSG_HDR_LEN + 16 {
            assert_eq!(parse_response(&buf), Ok(chosen), "v3={v3}");
        }
    }

    structured(data, |u| {
        let host_fw = versions(u, 6)?;
        let host_srv = versions(u, 6)?;
        let guest_fw = versions(u, 4)?;
        let guest_srv = versions(u, 4)?;
        let wire = build_request_packet(u64::arbitrary(u)?, &host_fw, &host_srv);
        let p = vmbus::packet::parse_packet(&wire).expect("own packet");
        let want = guest_fw
            .iter()
            .copied()
            .find(|g| host_fw.contains(g))
            .zip(guest_srv.iter().copied().find(|g| host_srv.contains(g)));
        assert!(host_fw.len() <= usize::from(MAX_VER_COUNT));
        for v3 in [false, true] {
            let mut payload = p.payload.to_vec();
            let got = if v3 {
                prep_negotiate_resp_v3(&mut payload, &guest_fw, &guest_srv)
            } else {
                prep_negotiate_resp(&mut payload, &guest_fw, &guest_srv)
            };
            assert_eq!(got, want, "v3={v3} host {host_fw:?}/{host_srv:?}");
            set_reply(&mut payload, 0).expect("IC headers");
            if payload.len() >= ICMSG_HDR_LEN + 16 {
                assert_eq!(parse_response(&payload), Ok(want));
            }
        }
        Ok(())
    });
}

/// `vmbus::fcopy` and `vmbus::utf16`: fcopy messages and the kernel's UTF-16 → UTF-8.
pub fn fcopy(data: &[u8]) {
    use vmbus::fcopy::{
        encode_start, encode_write, operation, parse_start, parse_write, StartFcopy, FCOPY_HDR_LEN,
        UTF8_NAME_MAX,
    };
    use vmbus::utf16::{encode_name, units_from_le_bytes, utf16s_to_utf8s, Overflow};
    use zerocopy::IntoBytes;

    assert_eq!(operation(data).is_ok(), data.len() >= FCOPY_HDR_LEN);
    if let Ok(start) = parse_start(data) {
        let bytes = start.as_bytes();
        assert_eq!(bytes, &data[..bytes.len()]);
        for overflow in [Overflow::Skip, Overflow::Stop] {
            let d = start.to_daemon(overflow);
            for name in [&d.file_name, &d.path_name] {
                let end = name.iter().position(|&b| b == 0).expect("NUL-terminated");
                assert!(end <= UTF8_NAME_MAX);
                assert!(name[end..].iter().all(|&b| b == 0));
                assert!(core::str::from_utf8(&name[..end]).is_ok());
            }
            assert_eq!(d.hdr.operation, start.hdr.operation);
        }
        let _ = StartFcopy::utf16_name(&start.file_name);
    }
    if let Ok(write) = parse_write(data) {
        let bytes = write.as_bytes();
        assert_eq!(bytes, &data[..bytes.len()]);
    }
    let units = units_from_le_bytes(data);
    assert_eq!(units.len(), data.len() / 2);
    for max in [0, 1, 3, UTF8_NAME_MAX, usize::MAX] {
        for overflow in [Overflow::Skip, Overflow::Stop] {
            let out = utf16s_to_utf8s(&units, max, overflow);
            assert!(out.len() <= max);
            assert!(!out.contains(&0));
            let s = core::str::from_utf8(&out).expect("valid UTF-8");
            // Valid UTF-16 converts exactly (up to the first NUL), when it fits.
            if max == usize::MAX {
                let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
                if let Ok(exact) = String::from_utf16(&units[..end]) {
                    assert_eq!(s, exact);
                }
            }
        }
    }

    structured(data, |u| {
        let file = text(u, 300)?;
        let path = text(u, 300)?;
        let (flags, size) = (u32::arbitrary(u)?, u64::arbitrary(u)?);
        let fits = |s: &str| !s.contains('\0') && s.encode_utf16().count() <= 259;
        match encode_start(&file, &path, flags, size) {
            Ok(wire) => {
                assert!(fits(&file) && fits(&path));
                assert!(encode_name(&file).is_ok());
                let start = parse_start(&wire).expect("own START");
                assert_eq!(StartFcopy::utf16_name(&start.file_name), file);
                assert_eq!(StartFcopy::utf16_name(&start.path_name), path);
                assert_eq!(
                    (start.copy_flags.get(), start.file_size.get()),
                    (flags, size)
                );
                let d = start.to_daemon(Overflow::Stop);
                if file.len() <= UTF8_NAME_MAX {
                    assert_eq!(StartFcopy::utf8_name(&d.file_name), file);
                }
            }
            Err(_) => assert!(!fits(&file) || !fits(&path)),
        }
        let offset = u64::arbitrary(u)?;
        let chunk = Vec::<u8>::arbitrary(u)?;
        let w = parse_write(&encode_write(offset, &chunk).expect("small chunk")).expect("own");
        assert_eq!(
            (w.offset.get(), w.size.get() as usize),
            (offset, chunk.len())
        );
        assert_eq!(&w.data[..chunk.len()], &chunk[..]);
        Ok(())
    });
}

/// `vmbus::kvp`: the daemon-side message and the host's reading of the guest's reply.
pub fn kvp(data: &[u8]) {
    use vmbus::kvp::op;
    use vmbus::kvp::{
        build_request_packet, encode_delete, encode_enumerate, encode_get, encode_get_ip_info,
        encode_set, parse_reply, utf8s_to_utf16s, KvpMsg, KvpValue, MAX_ADAPTER_ID_SIZE,
        MAX_KEY_SIZE, MAX_VALUE_SIZE, MSG_LEN, REG_SZ,
    };

    if let Ok(msg) = KvpMsg::from_prefix(data) {
        assert_eq!(msg.to_vec(), &data[..MSG_LEN]);
        assert!(!msg.version().contains('\0'));
        let mut m = msg;
        m.set_error(0xdead_beef);
        assert_eq!(m.error(), 0xdead_beef);
        assert_eq!(&m.to_vec()[4..], &data[4..MSG_LEN]);
    }
    if let Ok(r) = parse_reply(data) {
        assert!(r.key.encode_utf16().count() <= MAX_KEY_SIZE / 2);
        assert!(r.value.encode_utf16().count() <= MAX_VALUE_SIZE / 2);
        assert!(!r.key.contains('\0') && !r.value.contains('\0'));
        if let Some(ip) = &r.ip {
            assert!(ip.adapter_id.encode_utf16().count() <= MAX_ADAPTER_ID_SIZE);
        }
    }
    for max in [0, 1, 2, 255, usize::MAX] {
        let c = utf8s_to_utf16s(data, max);
        assert!(c.units.len() <= max);
        assert!(!c.units.contains(&0));
        assert!(String::from_utf16(&c.units).is_ok());
        assert!(c.ret() == -22 || c.ret() as usize == c.units.len());
    }

    structured(data, |u| {
        let pool = u.int_in_range(0..=4)?;
        let key = text(u, 300)?;
        let value = match u.int_in_range(0..=2)? {
            0 => KvpValue::Sz(text(u, 1100)?),
            1 => KvpValue::U32(u32::arbitrary(u)?),
            _ => KvpValue::U64(u64::arbitrary(u)?),
        };
        let which = u.int_in_range(0..=4)?;
        let (operation, body) = match which {
            0 => (op::GET, encode_get(pool, &key)),
            1 => (op::SET, encode_set(pool, &key, &value)),
            2 => (op::DELETE, encode_delete(pool, &key)),
            3 => (op::ENUMERATE, Ok(encode_enumerate(pool, u32::from(pool)))),
            _ => (op::GET_IP_INFO, encode_get_ip_info(&key, 1)),
        };
        let fits = |s: &str, units: usize| !s.contains('\0') && s.encode_utf16().count() < units;
        let Ok(body) = body else {
            let value_fits = match &value {
                KvpValue::Sz(s) => fits(s, MAX_VALUE_SIZE / 2),
                _ => true,
            };
            let key_units = if which == 4 {
                MAX_ADAPTER_ID_SIZE
            } else {
                MAX_KEY_SIZE / 2
            };
            assert!(!fits(&key, key_units) || (which == 1 && !value_fits));
            return Ok(());
        };
        let wire = build_request_packet(u64::arbitrary(u)?, u8::arbitrary(u)?, &body);
        let p = vmbus::packet::parse_packet(&wire).expect("own packet");
        // The guest echoes the request, so the host reads its own request as a reply.
        let r = parse_reply(p.payload).expect("own request as a reply");
        assert_eq!(r.operation, operation);
        match which {
            4 => assert_eq!(r.ip.expect("ip").adapter_id, key),
            3 => assert_eq!((r.pool, r.index), (pool, u32::from(pool))),
            _ => {
                assert_eq!((r.pool, &r.key), (pool, &key));
                if let (1, KvpValue::Sz(s)) = (which, &value) {
                    assert_eq!((r.value_type, &r.value), (REG_SZ, s));
                }
            }
        }
        Ok(())
    });
}

/// `vmbus::vss`: the daemon-side message and the host's reading of the guest's reply.
pub fn vss(data: &[u8]) {
    use vmbus::vss::{build_request_packet, encode_request, parse_reply, VssMsg, MSG_LEN};

    if let Ok(msg) = VssMsg::from_prefix(data) {
        assert_eq!(msg.to_vec(), &data[..MSG_LEN]);
        let mut m = msg;
        m.set_error(0x8000_4005);
        assert_eq!(m.error(), 0x8000_4005);
        assert_eq!(&m.to_vec()[4..], &data[4..MSG_LEN]);
    }
    if let Ok(r) = parse_reply(data) {
        assert_eq!(r.operation, data[ICMSG_HDR_LEN]);
        assert_eq!(r.dm_info_flags(), r.flags);
    }

    structured(data, |u| {
        let (operation, flags) = (u8::arbitrary(u)?, u32::arbitrary(u)?);
        let body = encode_request(operation, flags);
        assert_eq!(body.len(), MSG_LEN);
        let wire = build_request_packet(u64::arbitrary(u)?, u8::arbitrary(u)?, &body);
        let p = vmbus::packet::parse_packet(&wire).expect("own packet");
        let r = parse_reply(p.payload).expect("own request as a reply");
        assert_eq!((r.operation, r.flags, r.status), (operation, flags, 0));
        Ok(())
    });
}

/// `vmbus::xs_fastpath`: the GPA-direct request packet, the XSA1 requests, response headers
/// and LIST bodies.
pub fn xs_fastpath(data: &[u8]) {
    use vmbus::xs_fastpath::xstore::{
        check_name, check_prefix, encode_list, parse_list, parse_request, parse_response_header,
        Op, MAX_NAME_LEN,
    };
    use vmbus::xs_fastpath::{
        encode_request_packet, parse_request_packet, VspResponse, HV_PAGE_SIZE, MAX_PAGES,
    };

    if let Ok(p) = parse_request_packet(data) {
        assert!(!p.pfns.is_empty() && p.pfns.len() as u64 <= MAX_PAGES);
        assert_eq!(p.range_bytes(), p.pfns.len() as u64 * HV_PAGE_SIZE);
        let wire = encode_request_packet(p.trans_id, &p.pfns, &p.request).expect("re-encode");
        let q = parse_request_packet(&wire).expect("re-parse");
        assert_eq!(
            (q.trans_id, &q.pfns, q.request),
            (p.trans_id, &p.pfns, p.request)
        );
    }
    for data_len in [0, 1, 4096] {
        if let Ok(r) = parse_request(data, data_len) {
            assert!(r.name.len() <= MAX_NAME_LEN);
            if r.op == Op::LIST {
                assert!(check_prefix(&r.name).is_ok());
            } else {
                assert!(check_name(&r.name).is_ok());
            }
            assert_eq!(parse_request(&r.encode(), data_len), Ok(r));
        }
    }
    let _ = parse_response_header(data);
    let _ = VspResponse::read_lenient(data);
    if let Some((&count, rest)) = data.split_first() {
        if let Ok(names) = parse_list(rest, u64::from(count)) {
            assert_eq!(names.len(), usize::from(count));
            let (wire, n) = encode_list(names.iter().map(String::as_str), usize::MAX);
            assert_eq!(n, u64::from(count), "{names:?}");
            assert_eq!(&wire[..], &rest[..wire.len()]);
            assert_eq!(parse_list(&wire, n).as_ref(), Ok(&names));
        }
    }

    structured(data, |u| {
        let names: Vec<String> = (0..u.int_in_range(0..=8)?)
            .map(|_| text(u, 40))
            .collect::<ArbResult<_>>()?;
        let room = u.int_in_range(0..=512)?;
        let (wire, n) = encode_list(names.iter().map(String::as_str), room);
        assert!(wire.len() <= room);
        let back = parse_list(&wire, n).expect("own list");
        assert_eq!(&back[..], &names[..n as usize]);
        Ok(())
    });
}

/// `vmbus::guest_memory`: the frames through which the host reads and writes guest pages.
pub fn guest_memory(data: &[u8]) {
    use vmbus::guest_memory::{MemoryMessage, MAX_CHUNK, MEMORY_HEADER_LEN};

    if let Ok(m) = MemoryMessage::parse(data) {
        let wire = m.encode();
        assert_eq!(wire.len(), data.len());
        assert!(data.len() - MEMORY_HEADER_LEN <= MAX_CHUNK);
        assert_eq!(MemoryMessage::parse(&wire), Ok(m));
    }

    structured(data, |u| {
        let (trans_id, offset) = (u64::arbitrary(u)?, u64::arbitrary(u)?);
        let n = u.int_in_range(0..=64)?;
        let bytes = u.bytes(n)?;
        let m = match u.int_in_range(0..=2)? {
            0 => MemoryMessage::Read {
                trans_id,
                offset,
                len: u32::arbitrary(u)?,
            },
            1 => MemoryMessage::Data {
                trans_id,
                offset,
                status: u32::arbitrary(u)?,
                bytes,
            },
            _ => MemoryMessage::Write {
                trans_id,
                offset,
                bytes,
            },
        };
        assert_eq!(MemoryMessage::parse(&m.encode()), Ok(m));
        Ok(())
    });
}

/// `vmbus::lguest`: messages to and from the fake Guest.
pub fn lguest(data: &[u8]) {
    use vmbus::lguest::{Death, FromGuest, Start, ToGuest, MAX_REASON_LEN};

    if let Ok((guest, m)) = ToGuest::parse(data) {
        if let ToGuest::Died(Death::Reason(r)) = &m {
            assert!(r.len() <= MAX_REASON_LEN && !r.contains('\0'));
        }
        assert_eq!(ToGuest::parse(&m.encode(guest)), Ok((guest, m)));
    }
    if let Ok((guest, m)) = FromGuest::parse(data) {
        if let FromGuest::Kill { reason } = &m {
            assert!(reason.len() <= MAX_REASON_LEN && !reason.contains('\0'));
        }
        assert_eq!(FromGuest::parse(&m.encode(guest)), Ok((guest, m)));
    }

    structured(data, |u| {
        let guest = u32::arbitrary(u)?;
        // A reason without NUL round-trips, cut to MAX_REASON_LEN at a char boundary.
        let reason: String = text(u, 1100)?.replace('\0', "");
        let mut cut = reason.len().min(MAX_REASON_LEN);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let to = match u.int_in_range(0..=5)? {
            0 => ToGuest::Start(Start {
                word: u32::arbitrary(u)?,
                launcher_pid: u32::arbitrary(u)?,
                base: u64::arbitrary(u)?,
                pfn_limit: u64::arbitrary(u)?,
                start: u64::arbitrary(u)?,
            }),
            1 => ToGuest::Run {
                cause: u32::arbitrary(u)?,
            },
            2 => ToGuest::Irq {
                irq: u32::arbitrary(u)?,
            },
            3 => ToGuest::Died(Death::Reason(reason.clone())),
            4 => ToGuest::Died(Death::Restart),
            _ => ToGuest::Stop,
        };
        let (g, back) = ToGuest::parse(&to.encode(guest)).expect("own message");
        assert_eq!(g, guest);
        match (&to, back) {
            (ToGuest::Died(Death::Reason(_)), ToGuest::Died(Death::Reason(r))) => {
                assert_eq!(r, reason[..cut])
            }
            (to, back) => assert_eq!(*to, back),
        }
        let from = match u.int_in_range(0..=2)? {
            0 => FromGuest::Notify {
                addr: u64::arbitrary(u)?,
            },
            1 => FromGuest::Shutdown {
                message: u64::arbitrary(u)?,
                how: u32::arbitrary(u)?,
            },
            _ => FromGuest::Kill {
                reason: reason.clone(),
            },
        };
        let (g, back) = FromGuest::parse(&from.encode(guest)).expect("own message");
        assert_eq!(g, guest);
        match (&from, back) {
            (FromGuest::Kill { .. }, FromGuest::Kill { reason: r }) => {
                assert_eq!(r, reason[..cut])
            }
            (from, back) => assert_eq!(*from, back),
        }
        Ok(())
    });
}

/// A target body.
pub type Target = fn(&[u8]);

/// Every target by name (see [`TARGETS`]).
pub const TARGETS: &[(&str, Target)] = &[
    ("stream", stream),
    ("channel_msg", channel_msg),
    ("packet", packet),
    ("ic_negotiate", ic_negotiate),
    ("fcopy", fcopy),
    ("kvp", kvp),
    ("vss", vss),
    ("xs_fastpath", xs_fastpath),
    ("guest_memory", guest_memory),
    ("lguest", lguest),
    ("fuse_engine", fuse_engine),
    ("cuse_engine", cuse_engine),
    ("ioctl_retry", ioctl_retry),
    ("vhost_chain", vhost_chain),
    ("vsock_device", vsock_device),
];

/// The engine targets again, served by the real `Session` and its reader thread instead of
/// one request at a time on the caller's (see [`engine`]); the corpus replay runs both.
pub const THREADED_TARGETS: &[(&str, Target)] = &[
    ("fuse_engine", fuse_engine_threaded),
    ("cuse_engine", cuse_engine_threaded),
];

/// The FUSE engine (a mount's `DeviceDir` holding the toy device), requests served stepwise.
pub fn fuse_engine(data: &[u8]) {
    engine::run(data, Personality::Fuse, Mode::Stepped);
}

/// The CUSE personality (`CuseHandler`, CUSE_INIT, nodeid 0), requests served stepwise.
pub fn cuse_engine(data: &[u8]) {
    engine::run(data, Personality::Cuse, Mode::Stepped);
}

/// [`fuse_engine`] with the session's reader thread.
pub fn fuse_engine_threaded(data: &[u8]) {
    engine::run(data, Personality::Fuse, Mode::Threaded);
}

/// [`cuse_engine`] with the session's reader thread.
pub fn cuse_engine_threaded(data: &[u8]) {
    engine::run(data, Personality::Cuse, Mode::Threaded);
}
