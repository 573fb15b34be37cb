//! A host scripted by the test on cusedev's bus socket, frame by frame, with the `vmbus`
//! encoders: it can stop anywhere a real host never would (half a frame, then close).
//!
//! [`ScriptedHost::bind`] listens; [`ScriptedHost::session`] accepts cusedev's control stream
//! and answers its version negotiation and offer request; [`Session::offer`] offers a channel
//! and completes the open, returning the channel's stream. Every read is bounded in time, so a
//! guest that stays silent fails the test instead of hanging it.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmbus::channel_msg::ChannelMessage;
use vmbus::guid::Guid;
use vmbus::stream::{encode_frame, kind, FrameHeader, Hello, Role, FRAME_HEADER_LEN};

/// How long the scripted host waits for any frame from the guest.
const READ_LIMIT: Duration = Duration::from_secs(30);

/// One stream of the bus, host side.
pub struct HostStream(UnixStream);

impl HostStream {
    /// The next frame: (kind, body).
    pub fn frame(&mut self) -> (u16, Vec<u8>) {
        self.0.set_read_timeout(Some(READ_LIMIT)).unwrap();
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.0
            .read_exact(&mut header)
            .expect("a frame header from cusedev");
        let header = FrameHeader::parse(&header).expect("a valid frame header from cusedev");
        let mut body = vec![0u8; header.len as usize];
        self.0
            .read_exact(&mut body)
            .expect("a frame body from cusedev");
        (header.kind, body)
    }

    /// The next frame, which must be a channel message.
    pub fn control(&mut self) -> ChannelMessage {
        let (k, body) = self.frame();
        assert_eq!(k, kind::CONTROL, "a control frame");
        ChannelMessage::parse(&body).expect("a valid channel message from cusedev")
    }

    pub fn send_control(&mut self, message: &ChannelMessage) {
        self.send_bytes(&encode_frame(kind::CONTROL, &message.encode()));
    }

    /// Raw bytes, whatever they frame.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).expect("write to cusedev");
    }

    /// Sends the first `keep` bytes of `frame` and closes the stream: a host that dies, or a
    /// connection cut, in the middle of a frame.
    pub fn send_part_and_close(mut self, frame: &[u8], keep: usize) {
        assert!(keep < frame.len(), "a part, not the whole frame");
        self.send_bytes(&frame[..keep]);
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// A listener on the bus socket path, host side.
pub struct ScriptedHost {
    listener: UnixListener,
    path: PathBuf,
}

/// A control stream past version negotiation and the guest's request for offers.
pub struct Session {
    pub control: HostStream,
    host: ScriptedHost,
}

impl ScriptedHost {
    /// Listens at `path`, replacing a socket file a dead host left there.
    pub fn bind(path: &Path) -> ScriptedHost {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .unwrap_or_else(|e| panic!("bind the scripted host at {}: {e}", path.display()));
        ScriptedHost {
            listener,
            path: path.to_path_buf(),
        }
    }

    /// Accepts a stream and checks its HELLO says `role`.
    fn accept(&self, role: Role) -> (HostStream, Hello) {
        let (stream, _) = self.listener.accept().expect("cusedev connects");
        let mut stream = HostStream(stream);
        let (k, body) = stream.frame();
        assert_eq!(k, kind::HELLO, "the first frame of a stream is HELLO");
        let hello = Hello::parse(&body).expect("a valid HELLO");
        assert_eq!(hello.role, role);
        (stream, hello)
    }

    /// Accepts cusedev's control stream, accepts the first VMBus version it asks for and
    /// waits for its REQUEST_OFFERS.
    pub fn session(self) -> Session {
        let (mut control, _) = self.accept(Role::Control);
        let ChannelMessage::InitiateContact { .. } = control.control() else {
            panic!("expected INITIATE_CONTACT");
        };
        control.send_control(&ChannelMessage::VersionResponse {
            supported: true,
            conn_id: 1,
        });
        let ChannelMessage::RequestOffers = control.control() else {
            panic!("expected REQUEST_OFFERS");
        };
        Session {
            control,
            host: self,
        }
    }
}

impl Session {
    /// Offers a channel of class `class` on `relid`, opens it when cusedev asks and returns its
    /// stream (cusedev serves the device once the stream is there).
    pub fn offer(&mut self, class: Guid, relid: u32) -> HostStream {
        self.control.send_control(&ChannelMessage::Offer {
            if_type: class,
            if_instance: Guid::from_fields(relid, 2, 3, [4; 8]),
            child_relid: relid,
            connection_id: relid,
        });
        self.control
            .send_control(&ChannelMessage::AllOffersDelivered);
        let ChannelMessage::OpenChannel {
            child_relid,
            open_id,
        } = self.control.control()
        else {
            panic!("expected OPENCHANNEL for relid {relid}");
        };
        assert_eq!(child_relid, relid);
        self.control.send_control(&ChannelMessage::OpenResult {
            child_relid,
            open_id,
            status: 0,
        });
        let (channel, hello) = self.host.accept(Role::Channel);
        assert_eq!((hello.child_relid, hello.open_id), (relid, open_id));
        channel
    }

    /// Stops listening (the socket file goes too), so a guest that reconnects finds no host
    /// until another one binds; the control stream stays as it is.
    pub fn stop_listening(self) -> HostStream {
        let _ = std::fs::remove_file(&self.host.path);
        self.control
    }
}
