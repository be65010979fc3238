//! The delivery endpoint every replica serves on its HTTPS server (the admission webhook's):
//! `GET /v1/deliveries` answers the calling node's deliveries, each secret sealed to that
//! node's published key ([`crate::k8s::delivery`]).
//!
//! Who the caller is, the API server says: the token (header `X-Claw-Secrets-Authorization`,
//! which the API server's service proxy passes on, or `Authorization`) must be the agent
//! ServiceAccount's, for the audience [`AUDIENCE`], and bound to a pod on a node (the node
//! name in the user's extra, [`NODE_NAME_EXTRA`]); that node's deliveries are all it gets. A
//! token of the agent's ServiceAccount bound to no node, or any other account's, gets none.
//!
//! Without `have`, or with a cursor this replica cannot continue (another node key, other
//! labels, older than the deletions it remembers), the answer is the node's whole set
//! (`full`). With a cursor it can continue, only what changed since: the secrets added or
//! changed, and the objects to drop (deleted, or whose selection moved off the node). `wait=<seconds>`
//! waits (at most a minute) for something to change for the node; nothing did: `304`.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::listed::Listed;
use super::metrics::{Delivered, Metrics};
use super::secret_cache::{self, Cached, SharedSecrets};
use crate::crypto::{SealingPublicKey, SharedKeyring};
use crate::k8s::crd::{ClawNode, ClawSecret};
use crate::k8s::delivery::{
    self, AUDIENCE, Cursor, NODE_NAME_EXTRA, NodeDeliveries, Removed, Selection,
};

/// A new watch epoch ([`ChangeLog::epoch`]): random, so that no other replica's or earlier
/// run's is taken for it, and never 0.
fn new_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the system's random source");
    u64::from_le_bytes(bytes).max(1)
}

/// The longest a request may wait for a change.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// A token reviewed this recently is not reviewed again.
const REVIEW_FOR: Duration = Duration::from_secs(10);

/// At most this many reviews are kept (a flood of distinct tokens cannot exhaust memory).
const MAX_REVIEWS: usize = 4096;

/// Deletions remembered, at most: a cursor older than the oldest gets the whole set again.
const MAX_TOMBSTONES: usize = 50_000;

/// What the ClawSecret watch has seen: the highest revision, the deletions and the selection
/// changes since `horizon` (every one after that revision was seen; before it, some may not
/// have been).
struct ChangeLog {
    /// The highest revision in the cache (events are applied to it before they are seen here).
    max: u64,
    /// The highest revision of a (re)list in progress: its objects reach the cache only at its
    /// end, all at once.
    listing: u64,
    horizon: u64,
    /// This watch's epoch: set anew when a (re)list's revision is known, 0 during a relist. A
    /// cursor this epoch made was answered from this cache, so its node holds nothing the
    /// list left out, and every deletion and selection change after it is in this log (unless
    /// dropped: see `forgotten`); it continues whatever the `horizon`.
    epoch: u64,
    /// The highest revision of a deletion or selection change dropped from the log (the caps).
    forgotten: u64,
    tombstones: VecDeque<(u64, Removed)>,
    /// Each object's selection as last seen, by namespace and name.
    selections: HashMap<(String, String), Selection>,
    /// Objects whose selection changed, with the revision of the change.
    reselections: VecDeque<(u64, (String, String))>,
}

fn object_key(obj: &ClawSecret) -> (String, String) {
    (
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

impl ChangeLog {
    fn new() -> ChangeLog {
        ChangeLog {
            max: 0,
            listing: 0,
            horizon: u64::MAX,
            epoch: 0,
            forgotten: 0,
            tombstones: VecDeque::new(),
            selections: HashMap::new(),
            reselections: VecDeque::new(),
        }
    }

    /// An event of the cache's watch. An object this version cannot read is not delivered, so
    /// it is left out here too.
    fn saw(&mut self, event: &watcher::Event<Cached>) {
        match event {
            watcher::Event::Apply(DeserializeGuard(Ok(o))) => {
                let at = delivery::revision(o).unwrap_or(0);
                self.max = self.max.max(at);
                // A new object was on no node; one whose selection moved may be on nodes it no
                // longer selects.
                let key = object_key(o);
                let selection = Selection::of(o);
                if let Some(before) = self.selections.insert(key.clone(), selection.clone())
                    && before != selection
                {
                    self.reselections.push_back((at, key));
                    if self.reselections.len() > MAX_TOMBSTONES
                        && let Some((dropped, _)) = self.reselections.pop_front()
                    {
                        self.forget(dropped);
                    }
                }
            }
            watcher::Event::InitApply(DeserializeGuard(Ok(o))) => {
                self.listing = self.listing.max(delivery::revision(o).unwrap_or(0));
                self.selections.insert(object_key(o), Selection::of(o));
            }
            watcher::Event::Delete(DeserializeGuard(Ok(o))) => {
                let at = delivery::revision(o).unwrap_or(self.max);
                self.max = self.max.max(at);
                self.selections.remove(&object_key(o));
                self.tombstones.push_back((at, Removed::of(o)));
                if self.tombstones.len() > MAX_TOMBSTONES
                    && let Some((dropped, _)) = self.tombstones.pop_front()
                {
                    self.forget(dropped);
                }
            }
            // A (re)list: deletions and selection changes before it were not seen. Until the
            // revision it reached is known (see `relisted`), no cursor is continued.
            watcher::Event::Init => {
                self.horizon = u64::MAX;
                self.epoch = 0;
                self.listing = 0;
                self.selections.clear();
            }
            watcher::Event::InitDone => self.max = self.max.max(self.listing),
            watcher::Event::Apply(_) | watcher::Event::InitApply(_) | watcher::Event::Delete(_) => {
            }
        }
    }

    /// After a (re)list: every deletion and selection change after `revision` (at least the
    /// list's own) is seen.
    fn relisted(&mut self, revision: u64) {
        self.horizon = revision;
        self.epoch = new_epoch();
        self.tombstones.retain(|(at, _)| *at > revision);
        self.reselections.retain(|(at, _)| *at > revision);
    }

    /// A deletion or selection change at `revision` is no longer remembered.
    fn forget(&mut self, revision: u64) {
        self.horizon = self.horizon.max(revision);
        self.forgotten = self.forgotten.max(revision);
    }

    /// Where an answer made now leaves its node: the revision and the epoch its cursor names.
    fn position(&self) -> (u64, u64) {
        (self.max, self.epoch)
    }

    /// Whether a cursor at `revision` of `epoch` can be continued: everything it needs to be
    /// told since (deletions, selection changes) is in this log. Past the `horizon`, any
    /// cursor (another replica's, an earlier epoch's); below it, one this epoch made.
    fn continues(&self, revision: u64, epoch: u64) -> bool {
        revision >= self.horizon
            || (epoch != 0 && epoch == self.epoch && revision >= self.forgotten)
    }

    fn deleted_since(&self, since: u64) -> impl Iterator<Item = &Removed> {
        self.tombstones
            .iter()
            .filter(move |(at, _)| *at > since)
            .map(|(_, r)| r)
    }

    /// The objects whose selection changed after `since`.
    fn reselected_since(&self, since: u64) -> HashSet<(String, String)> {
        self.reselections
            .iter()
            .rev()
            .take_while(|(at, _)| *at > since)
            .map(|(_, key)| key.clone())
            .collect()
    }
}

/// What the endpoint reads: kept current by watches, in every replica.
pub struct Deliveries {
    client: kube::Client,
    keyring: SharedKeyring,
    metrics: Arc<Metrics>,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    agent_user: String,
    /// The replica's one ClawSecret cache; the leader's controller follows it too.
    secrets: Store<Cached>,
    shared: SharedSecrets,
    nodes: Store<Node>,
    claw_nodes: Store<ClawNode>,
    /// Set once `nodes` and `claw_nodes` hold their first list.
    nodes_listed: Listed,
    claw_nodes_listed: Listed,
    changes: watch::Receiver<u64>,
    log: Arc<Mutex<ChangeLog>>,
    /// Recent answers by SHA-256 of the token (never the token).
    reviews: Mutex<HashMap<[u8; 32], Reviewed>>,
}

/// When a token was reviewed, and the node it stands for (or why it stands for none).
type Reviewed = (Instant, Result<String, Refusal>);

/// Why a caller gets nothing: the status and a message that says what to fix.
#[derive(Debug, Clone)]
struct Refusal(StatusCode, String);

impl Deliveries {
    /// The endpoint, and the task that keeps its caches current (run it for as long as the
    /// endpoint is served).
    pub fn new(
        client: kube::Client,
        keyring: SharedKeyring,
        metrics: Arc<Metrics>,
        agent_user: String,
    ) -> (Arc<Deliveries>, impl Future<Output = ()> + Send + 'static) {
        let (changed, changes) = watch::channel(0u64);
        let (secrets, secrets_writer) = reflector::store::<Cached>();
        let shared = SharedSecrets::new(secrets.clone());
        let (nodes, nodes_writer) = reflector::store::<Node>();
        let (claw_nodes, claw_nodes_writer) = reflector::store::<ClawNode>();
        let (nodes_listed, claw_nodes_listed) = (Listed::new(), Listed::new());
        let log = Arc::new(Mutex::new(ChangeLog::new()));
        let watched = {
            use futures::StreamExt;
            let bump = move || {
                changed.send_modify(|n| *n = n.wrapping_add(1));
            };
            let (secrets_api, log_w, b1, follow) = (
                Api::<Cached>::all(client.clone()),
                log.clone(),
                bump.clone(),
                shared.clone(),
            );
            let secrets = watcher(secrets_api.clone(), watcher::Config::default())
                .default_backoff()
                .modify(secret_cache::lean)
                .reflect(secrets_writer)
                .for_each(move |event| {
                    let (secrets_api, log_w, b1) = (secrets_api.clone(), log_w.clone(), b1.clone());
                    match &event {
                        Ok(event) => follow.saw(event),
                        // Said here since the controller that said it follows this watch now.
                        Err(e) => tracing::warn!(kind = "ClawSecret", error = %e,
                            "watching failed; retrying"),
                    }
                    async move {
                        if let Ok(event) = &event {
                            log_w.lock().unwrap_or_else(|p| p.into_inner()).saw(event);
                            if matches!(event, watcher::Event::InitDone) {
                                // The revision the API server is at now is at or past the
                                // list's: every deletion after it comes through this watch.
                                let now = secrets_api
                                    .list_metadata(&kube::api::ListParams::default().limit(1))
                                    .await
                                    .ok()
                                    .and_then(|l| l.metadata.resource_version)
                                    .and_then(|v| v.parse().ok());
                                if let Some(now) = now {
                                    log_w
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .relisted(now);
                                }
                            }
                        }
                        b1();
                    }
                });
            let nodes = cached(
                Api::<Node>::all(client.clone()),
                nodes_writer,
                nodes_listed.clone(),
                labels_only,
                bump.clone(),
            );
            let claw_nodes = cached(
                Api::<ClawNode>::all(client.clone()),
                claw_nodes_writer,
                claw_nodes_listed.clone(),
                |n: &mut ClawNode| n.metadata.managed_fields = None,
                bump,
            );
            async move {
                tokio::join!(secrets, nodes, claw_nodes);
            }
        };
        let endpoint = Arc::new(Deliveries {
            client,
            keyring,
            metrics,
            agent_user,
            secrets,
            shared,
            nodes,
            claw_nodes,
            nodes_listed,
            claw_nodes_listed,
            changes,
            log,
            reviews: Mutex::new(HashMap::new()),
        });
        (endpoint, watched)
    }

    /// The ClawSecret cache, for the leader's controller to follow.
    pub(super) fn shared_secrets(&self) -> SharedSecrets {
        self.shared.clone()
    }

    /// The node a request's token (`X-Claw-Secrets-Authorization`) stands for, as for a
    /// delivery; `Err`: the status and message to refuse with.
    pub(super) async fn node_of_request(
        &self,
        headers: &hyper::HeaderMap,
    ) -> Result<String, (StatusCode, String)> {
        let token = bearer(headers).ok_or_else(|| {
            (
                StatusCode::UNAUTHORIZED,
                format!(
                    "send the agent's ServiceAccount token for audience {AUDIENCE:?} in \
                     'X-Claw-Secrets-Authorization: Bearer <token>'"
                ),
            )
        })?;
        self.node_of(token).await.map_err(|Refusal(s, m)| (s, m))
    }

    /// Answers one `GET /v1/deliveries`.
    pub async fn answer(
        &self,
        headers: &hyper::HeaderMap,
        query: Option<&str>,
    ) -> Response<Full<Bytes>> {
        match self.answer_or_refuse(headers, query).await {
            Ok(Some((body, full, secrets))) => {
                let answer = if full {
                    Delivered::Full
                } else {
                    Delivered::Changes
                };
                self.metrics.delivered(answer, secrets);
                reply(StatusCode::OK, body, true)
            }
            Ok(None) => {
                self.metrics.delivered(Delivered::Unchanged, 0);
                reply(StatusCode::NOT_MODIFIED, Vec::new(), false)
            }
            Err(Refusal(status, message)) => {
                self.metrics.delivered(Delivered::Refused, 0);
                reply(status, format!("{message}\n").into_bytes(), false)
            }
        }
    }

    async fn answer_or_refuse(
        &self,
        headers: &hyper::HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<(Vec<u8>, bool, usize)>, Refusal> {
        let token = bearer(headers).ok_or_else(|| {
            Refusal(
                StatusCode::UNAUTHORIZED,
                format!(
                    "send the agent's ServiceAccount token for audience {AUDIENCE:?} in \
                     'X-Claw-Secrets-Authorization: Bearer <token>'"
                ),
            )
        })?;
        let node = self.node_of(token).await?;
        let (have, wait) = parse_query(query)?;
        let ready = async {
            // Not the stores' own readiness, which wakes one waiter only (see `Listed`).
            tokio::join!(
                self.shared.wait_listed(),
                self.nodes_listed.wait(),
                self.claw_nodes_listed.wait(),
            );
        };
        let starting = || {
            Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the operator is still reading the cluster (or stopping); retry shortly".to_owned(),
            )
        };
        tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .map_err(|_| starting())?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.changes.clone();
        loop {
            // Marked seen before reading: a change from here on wakes the wait below.
            changes.borrow_and_update();
            let (key_id, public) = self.node_key(&node)?;
            let labels = self
                .nodes
                .get(&reflector::ObjectRef::new(&node))
                .map(|n| n.metadata.labels.clone().unwrap_or_default())
                .ok_or_else(|| {
                    Refusal(
                        StatusCode::CONFLICT,
                        format!("there is no Node {node:?} (yet); retry shortly"),
                    )
                })?;
            // The revision first, then the objects: everything at or below it is in them.
            let ((now, epoch), cursor) = {
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                let continued = have
                    .as_deref()
                    .and_then(Cursor::parse)
                    .filter(|c| log.continues(c.revision, c.epoch));
                (log.position(), continued)
            };
            let all = self.secrets.state();
            let all = all.iter().filter_map(|s| s.0.as_ref().ok());
            let labels_digest = delivery::labels_digest(&labels);
            let continued = cursor.filter(|c| c.key_id == key_id && c.labels == labels_digest);
            let (full, chosen, removed, since) = match &continued {
                Some(c) => {
                    let (reselected, deleted) = {
                        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                        let deleted: Vec<Removed> =
                            log.deleted_since(c.revision).cloned().collect();
                        (log.reselected_since(c.revision), deleted)
                    };
                    let moved = |o: &ClawSecret| reselected.contains(&object_key(o));
                    match delivery::changed_since(all.clone(), &labels, c.revision, moved) {
                        Some((changed, mut removed)) => {
                            removed.extend(deleted);
                            (false, changed, removed, c.revision)
                        }
                        None => (true, delivery::selected(all, &labels), Vec::new(), 0),
                    }
                }
                None => (true, delivery::selected(all, &labels), Vec::new(), 0),
            };
            if full || !chosen.is_empty() || !removed.is_empty() {
                let mut secrets = Vec::with_capacity(chosen.len());
                // One keyring for the whole answer (it may change under a running operator).
                let keyring = self.keyring.current();
                for obj in chosen {
                    match delivery::deliver(&node, &public, obj, &keyring) {
                        Ok(d) => secrets.push(d),
                        Err(why) => {
                            self.metrics.undeliverable();
                            tracing::warn!(%node,
                            namespace = obj.metadata.namespace.as_deref().unwrap_or_default(),
                            name = obj.metadata.name.as_deref().unwrap_or_default(),
                            reason = %why, "a secret meant for this node cannot be delivered")
                        }
                    }
                }
                let cursor = Cursor {
                    key_id: key_id.clone(),
                    labels: labels_digest,
                    revision: now.max(since),
                    epoch,
                };
                let count = secrets.len();
                let body = NodeDeliveries {
                    node,
                    node_key_id: key_id,
                    etag: cursor.to_text(),
                    full,
                    secrets,
                    removed,
                };
                return Ok(Some((
                    serde_json::to_vec(&body).expect("deliveries serialize"),
                    full,
                    count,
                )));
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Refusal(StatusCode::SERVICE_UNAVAILABLE, "the operator is stopping".to_owned()));
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    /// The node's published key, checked: its id and the key's agree.
    fn node_key(&self, node: &str) -> Result<(String, SealingPublicKey), Refusal> {
        let published = self
            .claw_nodes
            .get(&reflector::ObjectRef::new(node))
            .ok_or_else(|| {
                Refusal(
                    StatusCode::CONFLICT,
                    format!("node {node:?} has published no key (ClawNode {node:?}); its agent publishes it at start"),
                )
            })?;
        let public = SealingPublicKey::parse(&published.spec.public_key)
            .ok()
            .filter(|k| k.master_key_id().as_str() == published.spec.key_id)
            .ok_or_else(|| {
                Refusal(
                    StatusCode::CONFLICT,
                    format!("ClawNode {node:?} holds no usable public key; restart its agent to publish it again"),
                )
            })?;
        Ok((published.spec.key_id.clone(), public))
    }

    /// The node a token stands for: TokenReview (audience [`AUDIENCE`]); the agent's
    /// ServiceAccount, bound to a pod on a node. Answers are kept [`REVIEW_FOR`].
    async fn node_of(&self, token: &str) -> Result<String, Refusal> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        {
            let reviews = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, answer)) = reviews.get(&digest)
                && now.duration_since(*at) < REVIEW_FOR
            {
                return answer.clone();
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the token could not be reviewed ({e}); retry shortly"),
                )
            })?;
        let answer = self.judge(reviewed);
        let mut reviews = self.reviews.lock().unwrap_or_else(|p| p.into_inner());
        if reviews.len() >= MAX_REVIEWS {
            reviews.retain(|_, (at, _)| now.duration_since(*at) < REVIEW_FOR);
        }
        if reviews.len() < MAX_REVIEWS {
            reviews.insert(digest, (now, answer.clone()));
        }
        answer
    }

    fn judge(&self, reviewed: TokenReview) -> Result<String, Refusal> {
        let status = reviewed.status.unwrap_or_default();
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
        if status.authenticated != Some(true) || !audience_ok {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                format!("the token is not valid for audience {AUDIENCE:?}"),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.agent_user {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "{username} is not the claw-secrets agent ({}): deliveries go to agents only",
                    self.agent_user
                ),
            ));
        }
        match user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .as_deref()
        {
            Some([node]) if !node.is_empty() => Ok(node.clone()),
            _ => Err(Refusal(
                StatusCode::FORBIDDEN,
                format!(
                    "the token is bound to no node ({NODE_NAME_EXTRA}): use the token projected into the agent's pod"
                ),
            )),
        }
    }
}

/// A Node as deliveries read it: its name and labels (its status, with every image on the
/// node, is most of the object).
fn labels_only(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.spec = None;
    node.status = None;
}

/// Keeps `writer`'s cache of `api` current, calling `changed` after every event; `listed` is
/// set once the first list is in the cache.
async fn cached<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    listed: Listed,
    trim: impl FnMut(&mut K),
    changed: impl Fn(),
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .for_each(|event| {
            if let Ok(watcher::Event::InitDone) = event {
                listed.set();
            }
            changed();
            futures::future::ready(())
        })
        .await
}

/// The bearer token of `X-Claw-Secrets-Authorization`, else of `Authorization`.
fn bearer(headers: &hyper::HeaderMap) -> Option<&str> {
    ["x-claw-secrets-authorization", "authorization"]
        .iter()
        .filter_map(|h| headers.get(*h))
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// `have` (a cursor: letters, digits, '.', '-') and `wait` (whole seconds, at most [`MAX_WAIT`]).
fn parse_query(query: Option<&str>) -> Result<(Option<String>, Duration), Refusal> {
    let bad = |what: &str| Refusal(StatusCode::BAD_REQUEST, what.to_owned());
    let (mut have, mut wait) = (None, Duration::ZERO);
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("have", v))
                if v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
            {
                have = Some(v.to_owned());
            }
            Some(("wait", v)) => {
                let secs: u64 = v
                    .parse()
                    .map_err(|_| bad("wait must be a whole number of seconds"))?;
                wait = Duration::from_secs(secs).min(MAX_WAIT);
            }
            _ => return Err(bad("the parameters are have=<etag> and wait=<seconds>")),
        }
    }
    Ok((have, wait))
}

pub(super) fn reply(status: StatusCode, body: Vec<u8>, json: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let kind = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(kind),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keyring;

    #[test]
    fn the_query_is_parsed_strictly() {
        assert_eq!(parse_query(None).unwrap().0, None);
        let (have, wait) = parse_query(Some("have=ab12&wait=30")).unwrap();
        assert_eq!(
            (have.as_deref(), wait),
            (Some("ab12"), Duration::from_secs(30))
        );
        assert_eq!(parse_query(Some("wait=3600")).unwrap().1, MAX_WAIT);
        for bad in ["have=../x", "have=a/b", "wait=-1", "node=other", "have"] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
    }

    fn secret(name: &str, rv: u64) -> ClawSecret {
        let mut s = crate::k8s::crd::ClawSecret::new(
            name,
            serde_json::from_value(serde_json::json!({ "allowedWorkloads": [] })).unwrap(),
        );
        s.metadata.namespace = Some("team-a".to_owned());
        s.metadata.resource_version = Some(rv.to_string());
        s
    }

    #[test]
    fn deletions_are_remembered_only_from_where_the_watch_saw_them_all() {
        let mut log = ChangeLog::new();
        log.saw(&watcher::Event::Init);
        log.saw(&watcher::Event::InitApply(DeserializeGuard(Ok(secret(
            "a", 10,
        )))));
        assert_eq!(
            log.max, 0,
            "listed objects reach the cache at the list's end"
        );
        log.saw(&watcher::Event::InitDone);
        assert_eq!(log.max, 10);
        assert_eq!(
            log.horizon,
            u64::MAX,
            "no cursor continues before the list's revision is known"
        );
        log.relisted(20);
        assert_eq!(log.horizon, 20);
        log.saw(&watcher::Event::Delete(DeserializeGuard(Ok(secret(
            "b", 25,
        )))));
        log.saw(&watcher::Event::Apply(DeserializeGuard(Ok(secret(
            "c", 30,
        )))));
        assert_eq!(log.max, 30);
        let names = |since| {
            log.deleted_since(since)
                .map(|r| r.object.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(21), ["b"]);
        assert!(names(25).is_empty());
        // A relist forgets nothing it still needs, and continues no cursor until it is known.
        log.saw(&watcher::Event::Init);
        assert_eq!(log.horizon, u64::MAX);
    }

    /// The API server's revision moves with every kind (Events, Leases, ConfigMaps), so after a
    /// (re)list it is usually past every ClawSecret's. A node given its set then must be asked
    /// only for changes next, not given the whole set again at once: it would ask again at
    /// once, and every node would spin until some ClawSecret changed.
    #[test]
    fn a_cursor_made_after_a_relist_is_continued_though_the_api_server_is_further_on() {
        let mut log = ChangeLog::new();
        log.saw(&watcher::Event::Init);
        log.saw(&watcher::Event::InitApply(DeserializeGuard(Ok(secret(
            "a", 10,
        )))));
        log.saw(&watcher::Event::InitDone);
        log.relisted(500);
        let (revision, epoch) = log.position();
        assert_eq!(revision, 10);
        assert!(
            log.continues(revision, epoch),
            "the node that got this answer is told only what changes"
        );
        // The same revision from before the relist, or from another replica: deletions before
        // the list were not seen, so it gets the whole set.
        assert!(!log.continues(revision, epoch.wrapping_add(1)));
        assert!(!log.continues(revision, 0));
        // At or past the list's revision, any cursor continues.
        assert!(log.continues(500, 0));
        // Deletions seen from then on are told.
        log.saw(&watcher::Event::Delete(DeserializeGuard(Ok(secret(
            "a", 510,
        )))));
        assert_eq!(log.deleted_since(revision).count(), 1);
        // Once a relist begins, nothing made before it continues, until its own is known.
        log.saw(&watcher::Event::Init);
        assert!(!log.continues(revision, epoch));
        assert!(!log.continues(600, 0));
    }

    #[test]
    fn only_selection_changes_are_removals_for_other_nodes() {
        let mut log = ChangeLog::new();
        log.saw(&watcher::Event::Init);
        log.saw(&watcher::Event::InitApply(DeserializeGuard(Ok(secret(
            "a", 10,
        )))));
        log.saw(&watcher::Event::InitDone);
        log.relisted(10);
        // A status write, a data change: the selection is the same.
        log.saw(&watcher::Event::Apply(DeserializeGuard(Ok(secret(
            "a", 11,
        )))));
        // A new object: it was on no node.
        log.saw(&watcher::Event::Apply(DeserializeGuard(Ok(secret(
            "b", 12,
        )))));
        assert!(log.reselected_since(10).is_empty());
        // a's selector moves: nodes it selected before may hold it.
        let mut moved = secret("a", 13);
        moved.spec.node_selector = Some([("gpu".to_owned(), "true".to_owned())].into());
        log.saw(&watcher::Event::Apply(DeserializeGuard(Ok(moved.clone()))));
        let key = ("team-a".to_owned(), "a".to_owned());
        assert_eq!(log.reselected_since(12), [key.clone()].into());
        assert!(log.reselected_since(13).is_empty());
        // Its status written afterwards: still named to a cursor from before the move.
        moved.metadata.resource_version = Some("14".to_owned());
        log.saw(&watcher::Event::Apply(DeserializeGuard(Ok(moved))));
        assert_eq!(log.reselected_since(12), [key].into());
        assert!(log.reselected_since(13).is_empty());
        // A relist forgets what it would no longer continue from.
        log.relisted(20);
        assert!(log.reselected_since(0).is_empty());
    }

    #[test]
    fn a_trimmed_secret_delivers_as_the_whole_one() {
        use crate::crypto::SealingPrivateKey;
        let master = Keyring::generate().unwrap();
        let node = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(node.active()).public_key();
        let mut whole = crate::k8s::delivery::tests::sealed_secret(&master, "db", "canary-3", None);
        whole.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "{}".to_owned(),
            )]
            .into(),
        );
        whole.metadata.managed_fields = Some(vec![Default::default()]);
        whole.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        let mut trimmed = DeserializeGuard(Ok(whole.clone()));
        secret_cache::lean(&mut trimmed);
        let trimmed = trimmed.0.unwrap();
        assert!(
            trimmed.metadata.annotations.is_none() && trimmed.metadata.managed_fields.is_none()
        );
        let (a, b) = (
            delivery::deliver("node-a", &public, &whole, &master).unwrap(),
            delivery::deliver("node-a", &public, &trimmed, &master).unwrap(),
        );
        let open = |d: &delivery::Delivery| {
            let scope = crate::crypto::DeliveryScope {
                node: "node-a",
                namespace: &d.namespace,
                name: &d.object,
                version: d.version,
            };
            crate::crypto::open_delivery(&node, &scope, &d.data).unwrap()
        };
        assert_eq!(open(&a), open(&b));
        assert_eq!(
            (
                a.name,
                a.uid,
                a.resource_version,
                a.version,
                a.allowed_workloads,
                a.created_at,
                a.updated_at
            ),
            (
                b.name,
                b.uid,
                b.resource_version,
                b.version,
                b.allowed_workloads,
                b.created_at,
                b.updated_at
            )
        );
        let labels = Default::default();
        assert_eq!(
            delivery::meant_for(&whole, &labels),
            delivery::meant_for(&trimmed, &labels)
        );
        assert_eq!(Selection::of(&whole), Selection::of(&trimmed));
    }

    #[test]
    fn the_proxy_header_wins_over_authorization() {
        let mut h = hyper::HeaderMap::new();
        h.insert("authorization", "Bearer api-server-token".parse().unwrap());
        assert_eq!(bearer(&h), Some("api-server-token"));
        h.insert(
            "x-claw-secrets-authorization",
            "Bearer node-token".parse().unwrap(),
        );
        assert_eq!(bearer(&h), Some("node-token"));
        assert_eq!(bearer(&hyper::HeaderMap::new()), None);
    }
}
