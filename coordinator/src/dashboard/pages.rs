//! The dashboard's pages as HTML, from the same records the CLI shows: pure functions of what
//! they display (and the time), so that what a page says is tested without a browser. Every
//! text that comes from a user, a job or a rank is escaped.

use std::fmt::Write as _;

use cohort_proto::v1::{JobInfo, NodeInfo, RankMetrics};

use super::chart::{Series, line_chart};
use crate::lifecycle::JobState;
use crate::logs::fold::FoldedLine;
use crate::model::MetricHistory;

/// Seconds between reloads of a page that shows something running.
const RELOAD_S: u32 = 5;

/// `text` with `&`, `<`, `>`, `"` and `'` escaped, for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// A whole page: `title`, the navigation, `body`; reloaded every few seconds when `live`.
pub(super) fn page(title: &str, live: bool, body: &str) -> String {
    let reload = if live {
        // The one script of the dashboard: a live page refreshes itself.
        format!(
            "<script>setTimeout(() => location.reload(), {});</script>",
            RELOAD_S * 1000
        )
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{} · Cohort</title><style>{STYLE}</style></head><body>\
         <nav><b>Cohort</b> <a href=\"/\">jobs</a> <a href=\"/sweeps\">sweeps</a> \
         <a href=\"/nodes\">nodes</a></nav>\
         <main>{body}</main>{reload}</body></html>",
        escape(title)
    )
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#222}\
nav{background:#223;color:#fff;padding:8px 16px}nav a{color:#cde;margin-left:12px}\
main{padding:8px 16px}table{border-collapse:collapse;margin:8px 0}\
td,th{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}\
th{background:#f4f4f8}.state-failed{color:#b00}.state-succeeded{color:#070}\
.state-running{color:#05a}pre{background:#f7f7f7;padding:8px;overflow-x:auto}\
figure{display:inline-block;margin:8px}svg{border:1px solid #eee}\
svg text{font-size:11px;fill:#555}.axis{stroke:#999}.warning{color:#b50}";

/// A job state's name, as the CLI shows it.
fn state_name(state: i32) -> &'static str {
    JobState::from_proto(state).map_or("unknown", JobState::name)
}

/// A duration in seconds, for people (`42 s`, `3 min`, `5 h`).
pub(super) fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

/// The furthest step any rank reported, and the steps the run takes.
fn progress(metrics: &[RankMetrics]) -> Option<(u64, u64)> {
    let step = metrics.iter().map(|rank| rank.step).max()?;
    let total = metrics
        .iter()
        .map(|rank| rank.total_steps)
        .max()
        .unwrap_or(0);
    Some((step, total))
}

/// The jobs page: one row per job, newest first. `jobs` may hold summaries (no metrics) and
/// full records (running jobs) alike.
pub fn jobs_page(jobs: &[JobInfo], now_ms: i64) -> String {
    let mut body = String::from(
        "<h1>Jobs</h1><table id=\"jobs\"><tr><th>job</th><th>state</th><th>user</th>\
         <th>ranks</th><th>progress</th><th>throughput</th><th>age</th></tr>",
    );
    for job in jobs.iter().rev() {
        let state = state_name(job.state);
        let progress = match progress(&job.metrics) {
            Some((step, total)) if total > 0 => format!(
                "step {step} of {total} ({:.0}%)",
                step as f64 / total as f64 * 100.0
            ),
            Some((step, _)) => format!("step {step}"),
            None => "-".to_owned(),
        };
        let throughput = job.metrics.first().map_or("-".to_owned(), |rank| {
            format!("{:.0} samples/s", rank.samples_per_s)
        });
        let _ = write!(
            body,
            "<tr class=\"job\" data-job=\"{id}\"><td><a href=\"/jobs/{id}\">{id}</a> {name}</td>\
             <td class=\"state-{state}\">{state}</td><td>{user}</td><td>{ranks}</td><td>{progress}\
             </td><td>{throughput}</td><td>{age}</td></tr>",
            id = escape(&job.job_id),
            name = escape(&job.name),
            user = escape(&job.submitter),
            ranks = job.ranks,
            age = age((now_ms - job.submitted_at_unix_ms) / 1000),
        );
    }
    body.push_str("</table>");
    if jobs.is_empty() {
        body.push_str("<p>No jobs yet: <code>cohort submit JOB.toml</code>.</p>");
    }
    let live = jobs.iter().any(|job| !is_final(job.state));
    page("jobs", live, &body)
}

/// Whether a job in `state` has ended.
fn is_final(state: i32) -> bool {
    JobState::from_proto(state).is_some_and(JobState::is_terminal)
}

/// A job's page: what it is and why it is in its state, its curves (rank 0's loss and
/// evaluations; every rank's throughput), its ranks' latest figures and placement, its
/// attempts, and its log's last lines folded across ranks.
pub fn job_page(job: &JobInfo, curves: &MetricHistory, log: &[FoldedLine], now_ms: i64) -> String {
    let state = state_name(job.state);
    let mut body = format!(
        "<h1>{} <small>{}</small></h1><p>state <b class=\"state-{state}\" id=\"state\">{state}\
         </b>, user {}, {} ranks, submitted {} ago",
        escape(&job.job_id),
        escape(&job.name),
        escape(&job.submitter),
        job.ranks,
        age((now_ms - job.submitted_at_unix_ms) / 1000)
    );
    if job.max_restarts > 0 {
        let _ = write!(
            body,
            ", {} of {} restarts used",
            job.attempt, job.max_restarts
        );
    }
    body.push_str("</p>");
    if !job.reason.is_empty() {
        let _ = write!(body, "<p id=\"reason\">{}</p>", escape(&job.reason));
    }
    for straggler in &job.stragglers {
        let _ = write!(
            body,
            "<p class=\"warning straggler\">straggler: rank {} on node {} computes its steps \
             {:.2}x as long as the median (since step {})</p>",
            straggler.rank,
            escape(&straggler.node_id),
            straggler.slowdown,
            straggler.since_step
        );
    }
    let first = curves.ranks.values().next();
    let curve = |pick: fn(&crate::model::MetricPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        first.map_or_else(Vec::new, |points| {
            points
                .iter()
                .filter_map(|point| pick(point).map(|value| (point.step as f64, value)))
                .collect()
        })
    };
    let first_rank = curves.ranks.keys().next().copied().unwrap_or(0);
    let loss_name = format!("rank {first_rank} loss");
    body.push_str(&line_chart(
        "loss-chart",
        "training loss",
        "step",
        &[Series {
            name: &loss_name,
            points: curve(|point| Some(point.loss)),
        }],
    ));
    body.push_str(&line_chart(
        "evaluation-loss-chart",
        "evaluation loss",
        "step",
        &[Series {
            name: "loss",
            points: curve(|point| point.eval_loss),
        }],
    ));
    body.push_str(&line_chart(
        "evaluation-accuracy-chart",
        "evaluation accuracy",
        "step",
        &[Series {
            name: "accuracy",
            points: curve(|point| point.eval_accuracy),
        }],
    ));
    let names: Vec<String> = curves
        .ranks
        .keys()
        .map(|rank| format!("rank {rank}"))
        .collect();
    let throughput: Vec<Series<'_>> = curves
        .ranks
        .values()
        .zip(&names)
        .map(|(points, name)| Series {
            name,
            points: points
                .iter()
                .map(|point| (point.step as f64, point.samples_per_s))
                .collect(),
        })
        .collect();
    body.push_str(&line_chart(
        "throughput-chart",
        "throughput (samples/s)",
        "step",
        &throughput,
    ));
    body.push_str(&ranks_table(job));
    body.push_str(&attempts_table(job));
    body.push_str("<h2>Log (last lines, folded across ranks)</h2><pre id=\"log\">");
    for line in log {
        let _ = writeln!(body, "{}", escape(&line.to_string()));
    }
    body.push_str("</pre>");
    page(&job.job_id, !is_final(job.state), &body)
}

/// The ranks' latest figures and where they run.
fn ranks_table(job: &JobInfo) -> String {
    let mut html = String::from(
        "<h2>Ranks</h2><table id=\"ranks\"><tr><th>rank</th><th>node</th><th>pid</th>\
         <th>step</th><th>loss</th><th>samples/s</th><th>step time</th><th>forward</th>\
         <th>backward</th><th>optimizer</th><th>exposed comm.</th></tr>",
    );
    let milliseconds = |metrics: Option<&RankMetrics>, name: &str| {
        metrics
            .and_then(|metrics| metrics.extra.get(name))
            .map_or("-".to_owned(), |seconds| {
                format!("{:.1} ms", seconds * 1000.0)
            })
    };
    for placed in &job.rank_info {
        let metrics = job.metrics.iter().find(|m| m.rank == placed.rank);
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            placed.rank,
            escape(&placed.node_id),
            placed.pid,
            metrics.map_or("-".to_owned(), |m| m.step.to_string()),
            metrics.map_or("-".to_owned(), |m| format!("{:.4}", m.loss)),
            metrics.map_or("-".to_owned(), |m| format!("{:.0}", m.samples_per_s)),
            milliseconds(metrics, "median_step_s"),
            milliseconds(metrics, "median_forward_s"),
            milliseconds(metrics, "median_backward_s"),
            milliseconds(metrics, "median_optimizer_s"),
            milliseconds(metrics, "median_exposed_comm_s"),
        );
    }
    html.push_str("</table>");
    html
}

/// The job's ended attempts.
fn attempts_table(job: &JobInfo) -> String {
    if job.attempts.is_empty() {
        return String::new();
    }
    let mut html = String::from(
        "<h2>Attempts</h2><table id=\"attempts\"><tr><th>attempt</th><th>nodes</th>\
         <th>run time</th><th>ended because</th></tr>",
    );
    for attempt in &job.attempts {
        let run_time = if attempt.started_at_unix_ms > 0 {
            age((attempt.ended_at_unix_ms - attempt.started_at_unix_ms) / 1000)
        } else {
            "-".to_owned()
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{run_time}</td><td>{}</td></tr>",
            attempt.attempt + 1,
            escape(&attempt.nodes.join(", ")),
            escape(&attempt.reason)
        );
    }
    html.push_str("</table>");
    html
}

/// The nodes page: status, devices in use, heartbeat age, running ranks, straggler score.
pub fn nodes_page(nodes: &[NodeInfo], now_ms: i64) -> String {
    let mut body = String::from(
        "<h1>Nodes</h1><table id=\"nodes\"><tr><th>node</th><th>status</th><th>address</th>\
         <th>devices used</th><th>heartbeat</th><th>ranks</th><th>straggler score</th></tr>",
    );
    for node in nodes {
        let status = if node.draining {
            format!("{} (draining)", node.status)
        } else {
            node.status.clone()
        };
        let heartbeat = if node.last_heartbeat_unix_ms > 0 {
            format!("{} ago", age((now_ms - node.last_heartbeat_unix_ms) / 1000))
        } else {
            "-".to_owned()
        };
        let _ = write!(
            body,
            "<tr class=\"node\"><td>{}</td><td>{}</td><td>{}</td><td>{} of {}</td><td>{}</td>\
             <td>{}</td><td>{:.1}</td></tr>",
            escape(&node.node_id),
            escape(&status),
            escape(&node.address),
            node.busy_devices.len(),
            node.devices.len(),
            heartbeat,
            node.running_ranks,
            node.straggler_score
        );
    }
    body.push_str("</table>");
    page("nodes", true, &body)
}

/// A page that says what went wrong.
pub fn error_page(message: &str) -> String {
    page("error", false, &format!("<p>{}</p>", escape(message)))
}

#[cfg(test)]
mod tests {
    use cohort_proto::v1::{RankInfo, StragglerInfo};

    use super::*;
    use crate::model::MetricPoint;

    fn job(state: JobState) -> JobInfo {
        JobInfo {
            job_id: "mlp-1".to_owned(),
            name: "<script>alert(1)</script>".to_owned(),
            state: state.to_proto() as i32,
            submitter: "alice".to_owned(),
            ranks: 2,
            submitted_at_unix_ms: 1_000,
            metrics: vec![RankMetrics {
                rank: 0,
                step: 50,
                total_steps: 200,
                samples_per_s: 12_000.0,
                ..RankMetrics::default()
            }],
            rank_info: vec![RankInfo {
                rank: 0,
                node_id: "node-a".to_owned(),
                pid: 42,
                ..RankInfo::default()
            }],
            ..JobInfo::default()
        }
    }

    #[test]
    fn the_jobs_table_shows_progress_and_escapes_names() {
        let page = jobs_page(&[job(JobState::Running)], 61_000);
        assert!(page.contains("step 50 of 200 (25%)"), "{page}");
        assert!(page.contains("12000 samples/s"), "{page}");
        assert!(page.contains("<td>60 s</td>"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("location.reload"), "a running job reloads");
        let done = jobs_page(&[job(JobState::Succeeded)], 61_000);
        assert!(!done.contains("location.reload"), "nothing live, no reload");
    }

    #[test]
    fn a_job_page_charts_every_point_and_names_stragglers() {
        let mut info = job(JobState::Running);
        info.stragglers = vec![StragglerInfo {
            rank: 1,
            node_id: "node-b".to_owned(),
            slowdown: 1.5,
            since_step: 22,
        }];
        let mut curves = MetricHistory::default();
        for step in 1..=30 {
            curves.record(
                0,
                MetricPoint {
                    step,
                    epoch: 1,
                    loss: 2.0 / step as f64,
                    samples_per_s: 1000.0,
                    eval_loss: (step == 30).then_some(0.5),
                    eval_accuracy: (step == 30).then_some(0.8),
                    at_ms: 0,
                },
            );
        }
        let page = job_page(&info, &curves, &[], 61_000);
        let loss = &page[page.find("id=\"loss-chart\"").unwrap()..];
        let loss = &loss[..loss.find("</figure>").unwrap()];
        assert_eq!(loss.matches("class=\"point\"").count(), 30);
        assert!(page.contains("straggler: rank 1 on node node-b"), "{page}");
        assert!(page.contains("<td>node-a</td><td>42</td>"), "{page}");
    }

    #[test]
    fn the_nodes_page_shows_scores_and_heartbeats() {
        let node = NodeInfo {
            node_id: "node-a".to_owned(),
            status: "ready".to_owned(),
            last_heartbeat_unix_ms: 59_000,
            straggler_score: 1.5,
            ..NodeInfo::default()
        };
        let page = nodes_page(&[node], 61_000);
        assert!(page.contains("<td>2 s ago</td>"), "{page}");
        assert!(page.contains("<td>1.5</td>"), "{page}");
    }
}
