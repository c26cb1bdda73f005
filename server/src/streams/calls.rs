//! The calls stream: StartCall, JoinCall, DeclineCall, LeaveCall and
//! CallSignal from the client; CallJoined answers, CallEvent and
//! CallSignal pushes to it. The calls themselves are in [`crate::calls`].

use std::sync::Arc;

use chat_protocol::{Body, ErrorCode, StreamKind};
use quinn::SendStream;

use crate::error::Refusal;
use crate::hub::SessionHandle;
use crate::session::{Session, on_read_error};
use crate::wire::{self, FrameReader, Outbound};

/// Call requests per second a user may make (signals included: a call's
/// start trickles a few dozen ICE candidates each way).
pub const CALL_REQUEST_RATE: u32 = 20;

/// The burst of [`CALL_REQUEST_RATE`].
pub const CALL_REQUEST_BURST: u32 = 100;

/// Serves the calls stream until it or the connection ends.
pub async fn serve(session: Arc<Session>, send: SendStream, mut reader: FrameReader) {
    let authed = session.authed().expect("authenticated before data streams");
    let handle = authed.handle.clone();
    // Opens the stream's queue, and rings it for what rings the user now
    // (a device that opens its stream after the ring went out).
    session.shared.calls.opened(&handle);
    tokio::spawn(writer(session.clone(), send, handle.clone()));
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => return on_read_error(&session, StreamKind::Calls, e),
        };
        handle.touch(super::now_ms());
        let request_id = frame.request_id;
        // Boxed: inline, a start's store read would size this task, which
        // lives as long as the stream.
        if let Err(refusal) = Box::pin(request(&session, &handle, request_id, frame.body)).await {
            handle.push(
                StreamKind::Calls,
                Outbound::frame(&refusal.to_frame(request_id)),
            );
        }
        // A start or join that read the store while the connection closed
        // may have seated it after the clean-up looked (which takes the
        // same lock): take it out again.
        if session.is_closed() {
            session.shared.calls.disconnected(session.conn_id);
        }
    }
}

/// Handles one request; its answer is queued by the registry (CallJoined)
/// or here (Ok), a refusal by the caller.
async fn request(
    session: &Session,
    handle: &Arc<SessionHandle>,
    request_id: u64,
    body: Option<Body>,
) -> Result<(), Refusal> {
    let calls = &session.shared.calls;
    let charge = || {
        super::control::charge(session, &session.shared.call_limiter, |wait| {
            format!("over {CALL_REQUEST_RATE} call requests per second; retry in {wait} ms")
        })
    };
    let ok = || {
        handle.push(StreamKind::Calls, Outbound::frame(&super::ok(request_id)));
    };
    match body {
        Some(Body::StartCall(start)) => {
            charge()?;
            calls
                .start(handle, request_id, start.conversation_id, start.video)
                .await?;
            calls.confirm(handle).await;
            Ok(())
        }
        Some(Body::JoinCall(join)) => {
            charge()?;
            calls.join(handle, request_id, join.call_id).await?;
            calls.confirm(handle).await;
            Ok(())
        }
        Some(Body::DeclineCall(decline)) => {
            charge()?;
            calls.decline(handle, decline.call_id).map(|()| ok())
        }
        Some(Body::LeaveCall(leave)) => {
            // Hanging up is always possible; only refusals are charged.
            calls
                .leave(handle, leave.call_id)
                .map(|()| ok())
                .or_else(|refusal| {
                    charge()?;
                    Err(refusal)
                })
        }
        Some(Body::CallSignal(signal)) => {
            charge()?;
            if let Some(why) = chat_protocol::calls::check_signal(&signal.payload) {
                return Err(Refusal::new(ErrorCode::InvalidArgument, why));
            }
            calls
                .signal(
                    handle,
                    signal.call_id,
                    signal.participant_id,
                    signal.payload,
                )
                .map(|()| ok())
        }
        Some(other) => Err(Refusal::new(
            ErrorCode::UnexpectedFrame,
            format!("{} does not belong on the calls stream", other.name()),
        )),
        None => Err(Refusal::new(ErrorCode::MalformedFrame, "empty frame")),
    }
}

async fn writer(session: Arc<Session>, mut send: SendStream, handle: Arc<SessionHandle>) {
    wire::write_loop(
        &session.conn,
        &mut send,
        &handle,
        (&*session.shared.metrics, StreamKind::Calls),
        // Signaling is what a person waits on while a call connects: no
        // linger.
        (&session.shared.config.transport, false),
        |_| true,
    )
    .await;
}
