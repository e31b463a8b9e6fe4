//! Server-reflexive address discovery (STUN Binding, RFC 8489), sans-IO.
//!
//! str0m gathers no candidates itself, and its STUN parser is ICE-specific (it insists on
//! MESSAGE-INTEGRITY, which public STUN servers do not send). Messages are built and parsed with
//! `stun-types` (sans-IO); this module builds a Binding request, matches the response to it,
//! and parses `stun:` URLs. The runtime sends the request from each local socket and adds the
//! mapped address as a server-reflexive candidate.

use std::net::SocketAddr;

use stun_types::attribute::XorMappedAddress;
use stun_types::message::{BINDING, Message, MessageClass, MessageType, MessageWrite, MessageWriteVec, TransactionId};

/// A Binding request ready to send, and the transaction id its response must carry.
#[derive(Debug, Clone)]
pub struct BindingRequest {
    pub id: TransactionId,
    pub bytes: Vec<u8>,
}

/// A fresh Binding request (no credentials: public STUN servers take none).
pub fn binding_request() -> BindingRequest {
    let id = TransactionId::generate();
    let mtype = MessageType::from_class_method(MessageClass::Request, BINDING);
    let bytes = Message::builder(mtype, id, MessageWriteVec::new()).finish();
    BindingRequest { id, bytes }
}

/// The XOR-MAPPED-ADDRESS of a successful Binding response to `id`, if `data` is one.
pub fn mapped_address(data: &[u8], id: TransactionId) -> Option<SocketAddr> {
    let msg = Message::from_bytes(data).ok()?;
    if !msg.has_class(MessageClass::Success) || !msg.has_method(BINDING) || msg.transaction_id() != id {
        return None;
    }
    let xor = msg.attribute::<XorMappedAddress>().ok()?;
    Some(xor.addr(id))
}

/// Host and port of a `stun:` URL (`stun:host`, `stun:host:port`, `stun:[v6]:port`); `None`
/// for other schemes (`turn:` relays are not supported yet, `stuns:` needs TLS).
pub fn parse_stun_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("stun:")?;
    let rest = rest.split('?').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 3478,
        };
        return Some((host.to_owned(), port));
    }
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_owned(), p.parse().ok()?)),
        Some(_) => None,
        None if !rest.is_empty() => Some((rest.to_owned(), 3478)),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response encoded by a different STUN implementation (str0m's ICE agent) parses.
    #[test]
    fn response_from_another_implementation_is_understood() {
        let req = binding_request();
        // str0m's parser wants integrity on requests, so take the id from our own bytes.
        let mut id = [0u8; 12];
        id.copy_from_slice(&req.bytes[8..20]);
        assert_eq!(&req.bytes[0..2], &[0x00, 0x01], "Binding request type");
        let mapped: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let mut buf = vec![0u8; 256];
        let reply = str0m::ice::StunMessage::binding_reply(trans_id(id), mapped);
        let n = reply.to_bytes(None, &mut buf, |_, _| [0u8; 20]).unwrap();
        assert_eq!(mapped_address(&buf[..n], req.id), Some(mapped));
        assert_eq!(mapped_address(&buf[..n], binding_request().id), None, "other transaction");
        assert_eq!(mapped_address(b"garbage", req.id), None);
        assert_eq!(mapped_address(&req.bytes, req.id), None, "a request is not a response");
    }

    fn trans_id(b: [u8; 12]) -> str0m::ice::TransId {
        // TransId has no public constructor from bytes; its serde form is the byte array.
        serde_json::from_value(serde_json::json!(b)).unwrap()
    }

    #[test]
    fn stun_urls() {
        assert_eq!(parse_stun_url("stun:stun.l.google.com:19302"), Some(("stun.l.google.com".into(), 19302)));
        assert_eq!(parse_stun_url("stun:example.org"), Some(("example.org".into(), 3478)));
        assert_eq!(parse_stun_url("stun:[2001:db8::1]:3479"), Some(("2001:db8::1".into(), 3479)));
        assert_eq!(parse_stun_url("turn:example.org:3478?transport=udp"), None);
        assert_eq!(parse_stun_url("stun:"), None);
        assert_eq!(parse_stun_url("stun::3478"), None);
        assert_eq!(parse_stun_url("stun:host:notaport"), None);
    }
}
