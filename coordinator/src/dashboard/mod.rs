//! The web dashboard on the coordinator's HTTP endpoint (`--http`): `/` the jobs, `/jobs/ID` a
//! job (loss and evaluation curves, throughput per rank, its ranks' figures and placement, its
//! attempts, its log's last lines folded across ranks), `/sweeps` the sweeps and `/sweeps/ID`
//! one sweep (its trials' metric curves and its leaderboard, linking to the trials' jobs),
//! `/nodes` the nodes (devices in use, heartbeat, straggler score). Plain HTML drawn on the server, charts as inline SVG, and one
//! line of script (a live page reloads itself every few seconds): nothing to build, nothing
//! fetched from elsewhere.
//!
//! A browser logs in through a one-time link that `cohort dashboard` prints
//! (`/login?code=...`): the code, drawn by the coordinator for the CLI's caller, works once,
//! within [`CODE_LIFETIME`], and opens a session (an `HttpOnly`, `SameSite=Strict` cookie,
//! `Secure` over TLS) that sees what that caller sees with the CLI: a user their own jobs, an
//! admin every job. Codes and sessions live in the coordinator's memory only.
//!
//! - `chart`: the SVG line charts; `pages` and `sweep_pages`: the HTML of each page, pure
//!   functions of what they show.

mod chart;
pub mod pages;
pub mod sweep_pages;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use cohort_proto::JobId;
use cohort_proto::v1::{JobInfo, JobState, LogStream};
use tokio::sync::mpsc;

use crate::auth::access::sees_job;
use crate::auth::{Action, Caller, authorize};
use crate::cluster::{Cluster, SessionToken};
use crate::error::{Error, Result};
use crate::logs::fold::{Folder, RankLine};
use crate::model::now_ms;

/// How long a login code works.
pub const CODE_LIFETIME: Duration = Duration::from_secs(120);
/// How long a dashboard session lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Most codes, and most sessions, kept at once; past that the oldest go.
const MAX_ENTRIES: usize = 1024;
/// The session cookie's name.
const COOKIE: &str = "cohort_session";
/// Log lines a job page folds and shows, at most.
const LOG_TAIL_LINES: usize = 200;
/// Jobs the jobs page lists, at most (the newest).
const MAX_LISTED_JOBS: usize = 500;

/// Callers by secret, each until a deadline, the oldest dropped past [`MAX_ENTRIES`].
#[derive(Default)]
struct Grants {
    by_secret: HashMap<String, (Caller, Instant)>,
    order: VecDeque<String>,
}

impl Grants {
    fn insert(&mut self, secret: String, caller: Caller, lifetime: Duration) {
        let now = Instant::now();
        self.by_secret.retain(|_, (_, deadline)| *deadline > now);
        self.order
            .retain(|secret| self.by_secret.contains_key(secret));
        while self.order.len() >= MAX_ENTRIES {
            if let Some(oldest) = self.order.pop_front() {
                self.by_secret.remove(&oldest);
            }
        }
        self.by_secret
            .insert(secret.clone(), (caller, now + lifetime));
        self.order.push_back(secret);
    }

    fn get(&self, secret: &str) -> Option<Caller> {
        self.by_secret
            .get(secret)
            .filter(|(_, deadline)| *deadline > Instant::now())
            .map(|(caller, _)| caller.clone())
    }

    fn take(&mut self, secret: &str) -> Option<Caller> {
        let (caller, deadline) = self.by_secret.remove(secret)?;
        (deadline > Instant::now()).then_some(caller)
    }
}

/// Login codes and dashboard sessions.
#[derive(Default)]
pub struct Logins {
    codes: Mutex<Grants>,
    sessions: Mutex<Grants>,
}

impl Logins {
    /// A new one-time login code for `caller` (a user).
    pub fn issue_code(&self, caller: Caller) -> String {
        let code = SessionToken::generate().to_string();
        lock(&self.codes).insert(code.clone(), caller, CODE_LIFETIME);
        code
    }

    /// Uses up `code` and opens a session for its caller: the session's id, or `None` for a
    /// code that is unknown, used or expired.
    fn redeem(&self, code: &str) -> Option<String> {
        let caller = lock(&self.codes).take(code)?;
        let session = SessionToken::generate().to_string();
        lock(&self.sessions).insert(session.clone(), caller, SESSION_LIFETIME);
        Some(session)
    }

    /// The caller of session `id`, while it lasts.
    fn session(&self, id: &str) -> Option<Caller> {
        lock(&self.sessions).get(id)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the dashboard's handlers share.
#[derive(Clone)]
pub struct Dashboard {
    /// The cluster the pages show.
    pub cluster: Arc<Cluster>,
    /// Codes and sessions.
    pub logins: Arc<Logins>,
    /// Whether the endpoint serves TLS (session cookies are then `Secure`).
    pub tls: bool,
}

/// The dashboard's routes.
pub fn routes(dashboard: Dashboard) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(jobs))
        .route("/jobs/{job_id}", axum::routing::get(job))
        .route("/sweeps", axum::routing::get(sweeps))
        .route("/sweeps/{sweep_id}", axum::routing::get(sweep))
        .route("/nodes", axum::routing::get(nodes))
        .route("/login", axum::routing::get(login))
        .with_state(dashboard)
}

/// `GET /login?code=CODE[&next=/jobs/ID]`: opens a session and goes to `next` (a page of the
/// dashboard) or `/`.
async fn login(State(dashboard): State<Dashboard>, uri: Uri) -> Response {
    let query = uri.query().unwrap_or_default();
    let parameter = |name: &str| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
    };
    let Some(session) = parameter("code").and_then(|code| dashboard.logins.redeem(&code)) else {
        return refused(
            StatusCode::UNAUTHORIZED,
            "this login link is unknown, used or expired: run `cohort dashboard` for a new one",
        );
    };
    // Only a path of this dashboard: never another site.
    let next = parameter("next")
        .filter(|next| {
            next.starts_with('/')
                && !next.starts_with("//")
                && next
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/-_.".contains(c))
        })
        .unwrap_or_else(|| "/".to_owned());
    let secure = if dashboard.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_LIFETIME.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

/// The session's caller, from the request's cookie.
fn viewer(dashboard: &Dashboard, headers: &HeaderMap) -> Option<Caller> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, id)| dashboard.logins.session(id))
}

/// The answer to a browser without a session.
fn not_logged_in() -> Response {
    refused(
        StatusCode::UNAUTHORIZED,
        "not logged in: `cohort dashboard` prints a login link",
    )
}

/// An error page with `status`.
fn refused(status: StatusCode, message: &str) -> Response {
    (status, Html(pages::error_page(message))).into_response()
}

/// An error as a page, with the status its gRPC code maps to.
fn failed(error: Error) -> Response {
    let status = tonic::Status::from(error);
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refused(code, status.message())
}

/// `GET /`.
async fn jobs(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let Some(caller) = viewer(&dashboard, &headers) else {
        return not_logged_in();
    };
    match listed_jobs(&dashboard.cluster, &caller).await {
        Ok(jobs) => Html(pages::jobs_page(&jobs, now_ms())).into_response(),
        Err(error) => failed(error),
    }
}

/// The jobs `caller` sees, oldest first (at most the newest [`MAX_LISTED_JOBS`]), running
/// ones with their ranks' latest figures.
async fn listed_jobs(cluster: &Cluster, caller: &Caller) -> Result<Vec<JobInfo>> {
    authorize(caller, Action::ListJobs)?;
    let mut jobs = VecDeque::new();
    let mut token = String::new();
    loop {
        let page = cluster.jobs(0, &token).await?;
        for job in page.jobs {
            if sees_job(caller, &job.submitter) {
                if jobs.len() == MAX_LISTED_JOBS {
                    jobs.pop_front();
                }
                jobs.push_back(job);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut listed = Vec::with_capacity(jobs.len());
    for summary in jobs {
        let running = summary.state == JobState::Running as i32;
        let full = match JobId::new(&summary.job_id) {
            Ok(id) if running => cluster.job(&id).await.ok(),
            _ => None,
        };
        listed.push(full.unwrap_or(summary));
    }
    Ok(listed)
}

/// `GET /jobs/{job_id}`.
async fn job(
    State(dashboard): State<Dashboard>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = viewer(&dashboard, &headers) else {
        return not_logged_in();
    };
    match job_page(&dashboard.cluster, &caller, &job_id).await {
        Ok(page) => Html(page).into_response(),
        Err(error) => failed(error),
    }
}

/// Job `job_id`'s page as `caller` may see it.
async fn job_page(cluster: &Cluster, caller: &Caller, job_id: &str) -> Result<String> {
    let job_id =
        JobId::new(job_id).map_err(|error| Error::InvalidArgument(format!("job id: {error}")))?;
    let job = cluster.job(&job_id).await?;
    authorize(
        caller,
        Action::ReadJob {
            job_id: &job_id,
            owner: &job.submitter,
        },
    )?;
    let curves = cluster.job_metrics(&job_id, None).await?;
    let log = log_tail(cluster, &job_id).await?;
    Ok(pages::job_page(&job, &curves, &log, now_ms()))
}

/// The last [`LOG_TAIL_LINES`] lines of job `job_id`'s log, folded across ranks as
/// `cohort logs --collapse` folds them.
async fn log_tail(cluster: &Cluster, job_id: &JobId) -> Result<Vec<crate::logs::fold::FoldedLine>> {
    let (sender, mut receiver) = mpsc::channel(256);
    let reading = cluster.logs().stream_file(job_id, None, sender);
    let collecting = async {
        let mut tail = VecDeque::with_capacity(LOG_TAIL_LINES);
        while let Some(Ok(line)) = receiver.recv().await {
            if tail.len() == LOG_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    };
    let (read, tail) = tokio::join!(reading, collecting);
    read?;
    let mut folder = Folder::new();
    for line in tail {
        folder.push(RankLine {
            rank: line.rank,
            stderr: line.stream == LogStream::Stderr as i32,
            text: line.text,
        });
    }
    Ok(folder.finish())
}

/// `GET /sweeps`.
async fn sweeps(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let Some(caller) = viewer(&dashboard, &headers) else {
        return not_logged_in();
    };
    if let Err(error) = authorize(&caller, Action::ListJobs) {
        return failed(error);
    }
    let sweeps: Vec<_> = dashboard
        .cluster
        .sweeps()
        .await
        .into_iter()
        .filter(|sweep| sees_job(&caller, &sweep.submitter))
        .collect();
    Html(sweep_pages::sweeps_page(&sweeps, now_ms())).into_response()
}

/// `GET /sweeps/{sweep_id}`.
async fn sweep(
    State(dashboard): State<Dashboard>,
    Path(sweep_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = viewer(&dashboard, &headers) else {
        return not_logged_in();
    };
    match sweep_page(&dashboard.cluster, &caller, &sweep_id).await {
        Ok(page) => Html(page).into_response(),
        Err(error) => failed(error),
    }
}

/// Sweep `sweep_id`'s page as `caller` may see it: its best trials' curves are the first
/// rank's evaluations of each of their jobs, in step order.
async fn sweep_page(cluster: &Cluster, caller: &Caller, sweep_id: &str) -> Result<String> {
    let sweep_id = cohort_proto::SweepId::new(sweep_id)
        .map_err(|error| Error::InvalidArgument(format!("sweep id: {error}")))?;
    let (sweep, owner) = cluster.sweep(&sweep_id).await?;
    authorize(
        caller,
        Action::ReadSweep {
            sweep_id: &sweep_id,
            owner: &owner,
        },
    )?;
    let loss = sweep.metric == "eval_loss";
    let mut curves = Vec::new();
    for trial in sweep.trials.iter().take(sweep_pages::MAX_CHARTED_TRIALS) {
        let mut points = Vec::new();
        for job_id in &trial.job_ids {
            let Ok(job_id) = JobId::new(job_id) else {
                continue;
            };
            let history = cluster.job_metrics(&job_id, None).await?;
            let Some(first) = history.ranks.values().next() else {
                continue;
            };
            points.extend(first.iter().filter_map(|point| {
                let value = if loss {
                    point.eval_loss
                } else {
                    point.eval_accuracy
                };
                value.map(|value| (point.step as f64, value))
            }));
        }
        // One evaluation per step: the latest report of it.
        points.dedup_by(|later, earlier| later.0 == earlier.0);
        curves.push(sweep_pages::TrialCurve {
            trial: trial.trial,
            points,
        });
    }
    Ok(sweep_pages::sweep_page(&sweep, &curves, now_ms()))
}

/// `GET /nodes`.
async fn nodes(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let Some(caller) = viewer(&dashboard, &headers) else {
        return not_logged_in();
    };
    if let Err(error) = authorize(&caller, Action::ListNodes) {
        return failed(error);
    }
    let nodes = dashboard.cluster.nodes().await;
    Html(pages::nodes_page(&nodes, now_ms())).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Caller {
        Caller::User {
            name: "alice".to_owned(),
            admin: false,
        }
    }

    #[test]
    fn a_code_opens_one_session_once() {
        let logins = Logins::default();
        let code = logins.issue_code(alice());
        assert_eq!(code.len(), 32);
        let session = logins.redeem(&code).expect("a fresh code works");
        assert_eq!(logins.session(&session), Some(alice()));
        assert_eq!(logins.redeem(&code), None, "a code works once");
        assert_eq!(logins.redeem("guess"), None);
        assert_eq!(logins.session("guess"), None);
    }

    #[test]
    fn grants_expire_and_are_bounded() {
        let mut grants = Grants::default();
        grants.insert("old".to_owned(), alice(), Duration::ZERO);
        assert_eq!(grants.get("old"), None, "expired");
        for index in 0..MAX_ENTRIES + 10 {
            grants.insert(index.to_string(), alice(), Duration::from_secs(60));
        }
        assert!(grants.by_secret.len() <= MAX_ENTRIES);
        assert_eq!(grants.get("0"), None, "the oldest went first");
        assert!(grants.get(&(MAX_ENTRIES + 9).to_string()).is_some());
    }
}
