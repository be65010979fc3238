//! This server as a node of the OpenClaw gateway: it keeps one connection open (reconnecting
//! with capped, jittered backoff), answers each `node.invoke.request` through the same
//! [`Dispatcher`] as the HTTP server (so authorization, audit, idempotency and payloads are the
//! same on both transports), many at once, and gives up on a call when the gateway does.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::connection::{self, Endpoint, Hello, Refused, Session};
use super::frames::{self, CancelEvent, Credential, Inbound, InvokeEvent, ShutdownEvent};
use super::{DeviceIdentity, GatewayError, Principal, PrincipalIdentity};
use crate::invoke::{Authorizer, Command, Dispatcher, InvokeError, Repository};

/// The commands a node declares: all ten, no more (the gateway drops any it does not allow).
pub const COMMANDS: [&str; 10] = Command::NAMES;

/// Reconnection: from 250 ms, doubling, capped at 4 s, each wait drawn from its upper half
/// (jitter, so a fleet does not reconnect in step after a gateway restart). The cap keeps a
/// node back within about 4 s of its gateway; refusals that wait for a person (pairing
/// approval) are retried at the cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(4);
/// How long a stopping node waits for the calls in flight to be answered.
const DRAIN: Duration = Duration::from_secs(10);
/// Cancels that arrived before their request (in one read): kept this many at most.
const EARLY_CANCELS: usize = 1024;

/// How the node reaches and proves itself to its gateway.
pub struct GatewayConfig {
    pub endpoint: Endpoint,
    /// The gateway's shared token (`gateway.auth.token`).
    pub gateway_token: Option<Zeroizing<String>>,
    /// A single-use setup code minted for nodes (`device.pair.setupCode`).
    pub setup_code: Option<SetupCode>,
    /// How the gateway lists this node.
    pub display_name: String,
}

/// A setup code: base64url of `{url, bootstrapToken, expiresAtMs}`.
pub struct SetupCode {
    pub url: Option<String>,
    bootstrap_token: Zeroizing<String>,
    pub expires_at_ms: Option<i64>,
}

impl SetupCode {
    pub fn parse(code: &str) -> Result<Self, GatewayError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Decoded {
            #[serde(default)]
            url: Option<String>,
            bootstrap_token: Zeroizing<String>,
            #[serde(default)]
            expires_at_ms: Option<i64>,
        }
        let bytes = Zeroizing::new(B64URL.decode(code.trim().trim_end_matches('=')).map_err(
            |_| GatewayError::SetupCode("it is not base64url (copy it whole, as `openclaw gateway call device.pair.setupCode` printed it)".to_owned()),
        )?);
        let decoded: Decoded = serde_json::from_slice(&bytes)
            .map_err(|_| GatewayError::SetupCode("it does not hold a bootstrapToken".to_owned()))?;
        if decoded.bootstrap_token.is_empty() {
            return Err(GatewayError::SetupCode(
                "its bootstrapToken is empty".to_owned(),
            ));
        }
        Ok(SetupCode {
            url: decoded.url,
            bootstrap_token: decoded.bootstrap_token,
            expires_at_ms: decoded.expires_at_ms,
        })
    }
}

/// A gateway node's configuration, read and checked at start-up, before the server it will
/// serve through exists.
pub struct GatewaySetup {
    pub config: GatewayConfig,
    pub identity: DeviceIdentity,
    pub status: Arc<GatewayStatus>,
    /// The principal as configured (`--gateway-principal`), for the backend to resolve.
    pub principal: String,
}

impl GatewaySetup {
    /// The `/readyz` line of the gateway connection.
    pub fn readiness_note(&self) -> crate::invoke::ReadinessNote {
        let status = self.status.clone();
        Arc::new(move || status.line())
    }
}

/// What `/readyz` and the logs say about the gateway connection.
pub struct GatewayStatus {
    node_id: String,
    url: String,
    state: Mutex<Connected>,
}

enum Connected {
    Yes {
        since: jiff::Timestamp,
        auth: String,
    },
    No {
        problem: String,
    },
}

impl GatewayStatus {
    pub fn new(identity: &DeviceIdentity, endpoint: &Endpoint) -> Self {
        GatewayStatus {
            node_id: identity.node_id(),
            url: endpoint.url().to_owned(),
            state: Mutex::new(Connected::No {
                problem: "connecting".to_owned(),
            }),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.lock(), Connected::Yes { .. })
    }

    /// One line for `/readyz`.
    pub fn line(&self) -> String {
        match &*self.lock() {
            Connected::Yes { since, auth } => format!(
                "gateway: connected to {} as node {} since {since} ({auth})",
                self.url, self.node_id
            ),
            Connected::No { problem } => format!(
                "gateway: not connected to {} (node {}): {problem}; retrying",
                self.url, self.node_id
            ),
        }
    }

    fn set(&self, state: Connected) {
        *self.lock() = state;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connected> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which credential the next `connect` presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Using {
    DeviceToken,
    SetupCode,
    GatewayToken,
}

pub struct GatewayNode<A, R, P> {
    dispatcher: Arc<Dispatcher<A, R>>,
    principal: Arc<P>,
    identity: Arc<DeviceIdentity>,
    config: GatewayConfig,
    status: Arc<GatewayStatus>,
    node_id: Arc<str>,
    /// Credentials the gateway refused (or a setup code already spent): not tried again.
    refused: Mutex<HashSet<Using>>,
}

/// A `node.invoke.result` on its way: kept until the gateway acknowledges it, and sent again
/// while the gateway refuses it for a passing reason (under pairing changes it answers
/// UNAVAILABLE "node pairing changed before request dispatch") and the call's deadline allows.
struct Outgoing {
    /// The frame's request id, which the gateway's acknowledgement names.
    id: String,
    /// The frame (wiped when dropped: it may hold a secret's values).
    text: Zeroizing<String>,
    attempt: u32,
    /// The call's deadline: no point in answering after it.
    until: Instant,
}

/// The deadline of a call that came without `timeoutMs` (the gateway's own default).
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// How often a refused result is sent again, at most.
const RESULT_ATTEMPTS: u32 = 6;

/// How a session ended.
enum Ended {
    Stopped,
    Lost {
        why: String,
        back_in: Option<Duration>,
    },
}

impl<A: Authorizer, R: Repository, P: Principal> GatewayNode<A, R, P> {
    pub fn new(
        dispatcher: Arc<Dispatcher<A, R>>,
        principal: P,
        setup: GatewaySetup,
    ) -> Result<Self, GatewayError> {
        let GatewaySetup {
            config,
            identity,
            status,
            ..
        } = setup;
        let node_id: Arc<str> = identity.node_id().into();
        if config.gateway_token.is_none()
            && config.setup_code.is_none()
            && identity.device_token().is_none()
        {
            return Err(GatewayError::NoCredential);
        }
        if !config.endpoint.is_tls() && !config.endpoint.is_loopback() {
            tracing::warn!(
                url = config.endpoint.url(),
                "the gateway is reached over plain ws:// beyond loopback: the device token and every answer (secret values included) cross the network unencrypted; use wss://"
            );
        }
        Ok(GatewayNode {
            dispatcher,
            principal: Arc::new(principal),
            identity: Arc::new(identity),
            config,
            status,
            node_id,
            refused: Mutex::default(),
        })
    }

    /// The node id callers name (`openclaw nodes invoke --node <id>`).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn status(&self) -> Arc<GatewayStatus> {
        self.status.clone()
    }

    /// Connects, serves and reconnects until `stop` is cancelled; then answers the calls in
    /// flight (up to 10 s) and closes the connection.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let wait = match self.connect_once(&stop).await {
                None => return,
                Some(Ended::Stopped) => return,
                Some(Ended::Lost { why, back_in }) => {
                    self.status.set(Connected::No { problem: why });
                    match back_in {
                        // Connected, then lost: start the backoff afresh.
                        Some(hint) => {
                            backoff = BACKOFF_FIRST;
                            hint
                        }
                        None => {
                            let wait = jittered(backoff);
                            backoff = (backoff * 2).min(BACKOFF_CAP);
                            wait
                        }
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The credential to present now, best first: the saved device token, the setup code, the
    /// gateway token.
    fn credential(&self) -> Option<(Using, Zeroizing<String>)> {
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let device = self.identity.device_token();
        let candidates = [
            (Using::DeviceToken, device),
            (
                Using::SetupCode,
                self.config
                    .setup_code
                    .as_ref()
                    .map(|c| c.bootstrap_token.clone()),
            ),
            (Using::GatewayToken, self.config.gateway_token.clone()),
        ];
        let mut first_known = None;
        for (using, secret) in candidates {
            let Some(secret) = secret else { continue };
            if !refused.contains(&using) {
                return Some((using, secret));
            }
            first_known.get_or_insert((using, secret));
        }
        // Everything was refused once: try again with the best (the gateway may have been
        // wrong for a moment, or an admin may have fixed its side).
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        first_known
    }

    /// One connection: `None` when stopped before it opened; otherwise how it ended. The
    /// `back_in` of a lost connection is set when it had been serving (reconnect soon).
    async fn connect_once(&self, stop: &CancellationToken) -> Option<Ended> {
        let (using, secret) = self.credential()?;
        let credential = match using {
            Using::DeviceToken => Credential::DeviceToken(&secret),
            Using::SetupCode => Credential::BootstrapToken(&secret),
            Using::GatewayToken => Credential::GatewayToken(&secret),
        };
        let hello = Hello {
            display_name: &self.config.display_name,
            commands: &COMMANDS,
        };
        let attempt = connection::handshake(
            &self.config.endpoint,
            self.identity.key(),
            &hello,
            credential,
        );
        let session = tokio::select! {
            _ = stop.cancelled() => return Some(Ended::Stopped),
            session = attempt => session,
        };
        match session {
            Ok(session) => Some(self.on_connected(session, using, stop).await),
            Err(Refused::Transport(why)) => {
                tracing::debug!(url = self.config.endpoint.url(), %why, "gateway not reachable");
                Some(Ended::Lost {
                    why: format!("cannot connect: {why}"),
                    back_in: None,
                })
            }
            Err(Refused::Gateway(error)) => {
                Some(self.on_refused(using, credential.describe(), error))
            }
        }
    }

    fn on_refused(&self, using: Using, what: &str, error: frames::RemoteError) -> Ended {
        match error.detail_code() {
            Some("PAIRING_REQUIRED") => {
                tracing::warn!(
                    node_id = %self.node_id,
                    request_id = error.request_id().unwrap_or("?"),
                    "the gateway has not approved this device yet: approve it with `openclaw devices approve {}` (or connect with a setup code); retrying",
                    error.request_id().unwrap_or("<request id from `openclaw devices list`>")
                );
            }
            _ if error.code == "UNAVAILABLE" => {
                tracing::info!(error = %error, "the gateway is not ready yet; retrying");
            }
            _ => {
                tracing::warn!(
                    node_id = %self.node_id,
                    error = %error,
                    "the gateway refused {what}; trying the next credential configured"
                );
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(using);
            }
        }
        Ended::Lost {
            why: format!("the gateway refused {what}: {error}"),
            back_in: None,
        }
    }

    async fn on_connected(
        &self,
        session: Session,
        using: Using,
        stop: &CancellationToken,
    ) -> Ended {
        if let Some(token) = &session.device_token
            && self.identity.device_token().as_deref() != Some(token)
            && let Err(e) = self.identity.save_device_token(token)
        {
            tracing::error!(error = %e, "the gateway's device token could not be saved; the next start needs the gateway token or a new setup code");
        }
        if using == Using::SetupCode {
            // Single use: spent now; the device token replaces it.
            self.refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(Using::SetupCode);
        }
        let auth = session
            .auth_method
            .clone()
            .unwrap_or_else(|| "authenticated".to_owned());
        tracing::info!(
            url = self.config.endpoint.url(),
            node_id = %self.node_id,
            auth = %auth,
            principal = %self.principal.describe(),
            "connected to the OpenClaw gateway"
        );
        self.status.set(Connected::Yes {
            since: jiff::Timestamp::now(),
            auth: format!("auth: {auth}"),
        });
        self.serve(session, stop).await
    }

    /// Serves one connected session until it ends.
    async fn serve(&self, session: Session, stop: &CancellationToken) -> Ended {
        let Session {
            mut socket,
            max_payload,
            tick,
            ..
        } = session;
        // Two ticks without a frame: the link is dead, whatever TCP believes.
        let silence = tick * 2 + Duration::from_secs(5);
        let (answers, mut to_send) = mpsc::channel::<Outgoing>(256);
        let mut unacknowledged: HashMap<String, Outgoing> = HashMap::new();
        let mut calls = Calls::default();
        let mut tasks = JoinSet::new();
        let mut heard = Instant::now();
        let mut back_in = Duration::ZERO;
        let ended = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ended::Stopped,
                Some(out) = to_send.recv() => {
                    // A copy goes to the socket; the frame is kept until acknowledged.
                    if let Err(e) = socket.send(Message::text(out.text.as_str())).await {
                        break Ended::Lost { why: format!("sending failed: {e}"), back_in: Some(back_in) };
                    }
                    unacknowledged.insert(out.id.clone(), out);
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep_until((heard + silence).into()) => {
                    break Ended::Lost {
                        why: format!("nothing heard from the gateway for {} s", silence.as_secs()),
                        back_in: Some(back_in),
                    };
                }
                message = socket.next() => {
                    heard = Instant::now();
                    // Whatever else has already arrived is read with it, so a cancel that came
                    // in the same read as its request stops that request before it starts.
                    let mut batch = vec![message];
                    while batch.len() < 64 {
                        match socket.next().now_or_never() {
                            Some(next) => batch.push(next),
                            None => break,
                        }
                    }
                    let mut frames = Vec::with_capacity(batch.len());
                    let mut closed = None;
                    for message in batch {
                        match message {
                            None => { closed = Some("the gateway closed the connection".to_owned()); break }
                            Some(Err(e)) => { closed = Some(format!("the connection failed: {e}")); break }
                            Some(Ok(Message::Text(text))) => match Inbound::parse(&text) {
                                Ok(frame) => frames.push(frame),
                                Err(why) => tracing::warn!(%why, "a frame from the gateway is not protocol v4; ignored"),
                            },
                            Some(Ok(Message::Close(frame))) => {
                                closed = Some(match frame {
                                    Some(f) => format!("the gateway closed the connection ({} {})", u16::from(f.code), f.reason),
                                    None => "the gateway closed the connection".to_owned(),
                                });
                                break;
                            }
                            // Pings are answered by the WebSocket layer as it reads.
                            Some(Ok(_)) => {}
                        }
                    }
                    // Cancels first, then everything else in order.
                    let (cancels, others): (Vec<_>, Vec<_>) = frames
                        .into_iter()
                        .partition(|f| matches!(f, Inbound::Event { event, .. } if event == "node.invoke.cancel"));
                    for frame in cancels.into_iter().chain(others) {
                        if let Some(hint) = self.on_frame(frame, &mut calls, &mut tasks, &answers, &mut unacknowledged, max_payload) {
                            back_in = hint;
                        }
                    }
                    if let Some(why) = closed {
                        break Ended::Lost { why, back_in: Some(back_in) };
                    }
                }
            }
        };
        self.status.set(Connected::No {
            problem: match &ended {
                Ended::Stopped => "stopped".to_owned(),
                Ended::Lost { why, .. } => why.clone(),
            },
        });
        if matches!(ended, Ended::Stopped) {
            // Answer what is in flight, then say goodbye.
            let drained = tokio::time::timeout(DRAIN, async {
                while tasks.join_next().await.is_some() {}
                while let Ok(out) = to_send.try_recv() {
                    let _ = socket.send(Message::text(out.text.as_str())).await;
                }
            })
            .await;
            if drained.is_err() {
                tracing::warn!("calls still in flight after 10 s were not answered");
            }
            let _ = socket.close(None).await;
        } else {
            tracing::warn!(
                node_id = %self.node_id,
                problem = %self.status.line(),
                "lost the gateway connection; reconnecting"
            );
        }
        ended
    }

    /// Handles one frame; returns how soon to reconnect if it announces a shutdown.
    fn on_frame(
        &self,
        frame: Inbound,
        calls: &mut Calls,
        tasks: &mut JoinSet<()>,
        answers: &mpsc::Sender<Outgoing>,
        unacknowledged: &mut HashMap<String, Outgoing>,
        max_payload: usize,
    ) -> Option<Duration> {
        match frame {
            Inbound::Event { event, payload } => {
                let payload = payload.as_deref().map_or("null", |p| p.get());
                match event.as_str() {
                    "node.invoke.request" => {
                        self.start_call(payload, calls, tasks, answers, max_payload)
                    }
                    "node.invoke.cancel" => match serde_json::from_str::<CancelEvent>(payload) {
                        Ok(cancel) => calls.cancel(&cancel.invoke_id),
                        Err(_) => {
                            tracing::warn!("a node.invoke.cancel without an invokeId; ignored")
                        }
                    },
                    "shutdown" => {
                        let shutdown: ShutdownEvent =
                            serde_json::from_str(payload).unwrap_or(ShutdownEvent {
                                reason: None,
                                restart_expected_ms: None,
                            });
                        tracing::info!(
                            reason = shutdown.reason.as_deref().unwrap_or("unspecified"),
                            restart_expected_ms = shutdown.restart_expected_ms,
                            "the gateway is shutting down"
                        );
                        return Some(
                            shutdown
                                .restart_expected_ms
                                .map_or(BACKOFF_FIRST, Duration::from_millis)
                                .min(BACKOFF_CAP),
                        );
                    }
                    // tick, health, node.pair.resolved, …: nothing for a node to do.
                    other => tracing::trace!(event = other, "gateway event ignored"),
                }
            }
            Inbound::Res { id, ok: true, .. } => {
                unacknowledged.remove(&id);
            }
            Inbound::Res {
                id,
                ok: false,
                error,
                ..
            } => {
                let passing = error.as_ref().is_some_and(|e| e.code == "UNAVAILABLE");
                let error = error.map_or_else(|| "no error given".to_owned(), |e| e.to_string());
                match unacknowledged.remove(&id) {
                    Some(mut out)
                        if passing
                            && out.attempt + 1 < RESULT_ATTEMPTS
                            && Instant::now() < out.until =>
                    {
                        tracing::debug!(request = %id, %error, attempt = out.attempt, "the gateway refused a result for now; sending it again");
                        let answers = answers.clone();
                        tasks.spawn(async move {
                            tokio::time::sleep(Duration::from_millis(50 << out.attempt)).await;
                            out.attempt += 1;
                            let _ = answers.send(out).await;
                        });
                    }
                    _ => {
                        tracing::warn!(request = %id, %error, "the gateway refused a frame of this node")
                    }
                }
            }
            Inbound::Req { method } => {
                tracing::debug!(%method, "a request from the gateway ignored (nodes answer events)")
            }
        }
        None
    }

    /// Starts answering one `node.invoke.request`.
    fn start_call(
        &self,
        payload: &str,
        calls: &mut Calls,
        tasks: &mut JoinSet<()>,
        answers: &mpsc::Sender<Outgoing>,
        max_payload: usize,
    ) {
        let invoke = match serde_json::from_str::<InvokeEvent>(payload) {
            Ok(invoke) => invoke,
            Err(e) => {
                // Answerable only if its id can be read.
                #[derive(Deserialize)]
                struct IdOnly {
                    id: String,
                }
                let why = crate::invoke::sanitize_serde_message(&e.to_string());
                match serde_json::from_str::<IdOnly>(payload) {
                    Ok(IdOnly { id }) => {
                        tracing::warn!(invoke = %id, %why, "a malformed node.invoke.request; answered INVALID_ARGUMENT");
                        let response = crate::invoke::InvokeResponse::failure(
                            id.clone(),
                            InvokeError::invalid(format!(
                                "the node.invoke.request is malformed: {why}"
                            )),
                        );
                        let frame_id = next_frame_id();
                        let text = frames::invoke_result(
                            &frame_id,
                            &id,
                            &self.node_id,
                            &response,
                            max_payload,
                        );
                        let _ = answers.try_send(Outgoing {
                            id: frame_id,
                            text,
                            attempt: 0,
                            until: Instant::now() + DEFAULT_DEADLINE,
                        });
                    }
                    Err(_) => tracing::warn!(%why, "a node.invoke.request without an id; ignored"),
                }
                return;
            }
        };
        let cancel = calls.start(&invoke.id);
        let budget = invoke
            .timeout_ms
            .map(|ms| Duration::from_millis(ms.max(0) as u64));
        let until = Instant::now() + budget.unwrap_or(DEFAULT_DEADLINE);
        if budget == Some(Duration::ZERO) {
            cancel.cancel();
        }
        tracing::debug!(invoke = %invoke.id, command = %invoke.command, timeout_ms = invoke.timeout_ms, "invoke from the gateway");
        let dispatcher = self.dispatcher.clone();
        let principal = self.principal.clone();
        let node_id = self.node_id.clone();
        let answers = answers.clone();
        let in_flight = calls.in_flight.clone();
        tasks.spawn(async move {
            let work = answer(&dispatcher, principal.as_ref(), &node_id, &invoke, cancel.clone());
            tokio::pin!(work);
            let response = match budget {
                None => work.await,
                Some(budget) => tokio::select! {
                    response = &mut work => response,
                    _ = tokio::time::sleep(budget) => {
                        // The core stops at its next safe point; a commit under way completes.
                        cancel.cancel();
                        work.await
                    }
                },
            };
            in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&invoke.id);
            if cancel.is_cancelled() {
                // The gateway has answered its caller (TIMEOUT) and ignores late results; a
                // retry with the same idempotency key finds whatever was committed.
                tracing::info!(invoke = %invoke.id, command = %invoke.command, "invoke given up by the gateway; not answered");
                return;
            }
            let frame_id = next_frame_id();
            let text = frames::invoke_result(&frame_id, &invoke.id, &node_id, &response, max_payload);
            let _ = answers
                .send(Outgoing { id: frame_id, text, attempt: 0, until })
                .await;
        });
    }
}

/// One call: its caller (the configured principal), then the dispatcher.
async fn answer<A: Authorizer, R: Repository, P: Principal>(
    dispatcher: &Dispatcher<A, R>,
    principal: &P,
    node_id: &str,
    invoke: &InvokeEvent,
    cancel: CancellationToken,
) -> crate::invoke::InvokeResponse {
    let caller = match principal.resolve().await {
        Ok(PrincipalIdentity::Caller(caller)) => Ok(caller),
        Ok(PrincipalIdentity::Bearer(token)) => dispatcher.authenticate(Some(&token)).await,
        Err(e) => Err(e),
    }
    .map(|mut caller| {
        caller.gateway_node = Some(node_id.to_owned());
        caller
    });
    if Command::is_audited(&invoke.command) {
        tracing::trace!(invoke = %invoke.id, "audited command through the gateway");
    }
    dispatcher
        .handle_request(caller, invoke.to_request(), Some(cancel))
        .await
}

/// The calls in flight, by invoke id, and cancels that came before their request.
#[derive(Default)]
struct Calls {
    in_flight: Arc<Mutex<HashMap<String, CancellationToken>>>,
    early: VecDeque<String>,
}

impl Calls {
    fn start(&mut self, id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        if let Some(at) = self.early.iter().position(|e| e == id) {
            self.early.remove(at);
            token.cancel();
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), token.clone());
        token
    }

    fn cancel(&mut self, id: &str) {
        match self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            Some(token) => token.cancel(),
            None => {
                if self.early.len() == EARLY_CANCELS {
                    self.early.pop_front();
                }
                self.early.push_back(id.to_owned());
            }
        }
    }
}

fn next_frame_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("r{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A wait drawn from [d/2, d].
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    let fraction = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d / 2 + d.mul_f64(fraction / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setup_code_is_read_and_garbage_is_refused_with_what_to_do() {
        let code =
            B64URL.encode(br#"{"url":"ws://127.0.0.1:1","bootstrapToken":"bt","expiresAtMs":5}"#);
        let parsed = SetupCode::parse(&code).unwrap();
        assert_eq!(parsed.url.as_deref(), Some("ws://127.0.0.1:1"));
        assert_eq!(parsed.bootstrap_token.as_str(), "bt");
        assert_eq!(parsed.expires_at_ms, Some(5));
        let err = SetupCode::parse("not base64!").err().unwrap().to_string();
        assert!(err.contains("base64url"), "{err}");
        let err = SetupCode::parse(&B64URL.encode(b"{}"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bootstrapToken"), "{err}");
    }

    #[test]
    fn backoff_waits_are_jittered_within_their_upper_half() {
        for _ in 0..100 {
            let w = jittered(Duration::from_secs(4));
            assert!(
                w >= Duration::from_secs(2) && w <= Duration::from_secs(4),
                "{w:?}"
            );
        }
    }

    #[test]
    fn a_cancel_that_comes_first_cancels_its_call_at_start() {
        let mut calls = Calls::default();
        calls.cancel("a");
        assert!(calls.start("a").is_cancelled());
        assert!(!calls.start("b").is_cancelled());
        calls.cancel("b");
        assert!(calls.in_flight.lock().unwrap()["b"].is_cancelled());
    }
}
