//! The dashboard's sweep pages: every sweep, and one sweep's leaderboard with its trials'
//! metric curves. Pure functions of what they show, like [`super::pages`].

use std::fmt::Write as _;

use cohort_proto::v1::SweepInfo;

use super::chart::{Series, line_chart};
use super::pages::{age, escape, page};

/// Most trials whose curves one chart draws (the best of the leaderboard).
pub const MAX_CHARTED_TRIALS: usize = 12;

/// A trial's curve: its number and its metric over its steps, every segment in order.
pub struct TrialCurve {
    /// The trial's number.
    pub trial: u32,
    /// `(step, value)` of each evaluation it reported.
    pub points: Vec<(f64, f64)>,
}

/// The sweeps page: one row per sweep, newest first.
pub fn sweeps_page(sweeps: &[SweepInfo], now_ms: i64) -> String {
    let mut body = String::from(
        "<h1>Sweeps</h1><table id=\"sweeps\"><tr><th>sweep</th><th>state</th><th>user</th>\
         <th>searcher</th><th>metric</th><th>steps used</th><th>age</th></tr>",
    );
    for sweep in sweeps.iter().rev() {
        let _ = write!(
            body,
            "<tr class=\"sweep\"><td><a href=\"/sweeps/{id}\">{id}</a></td>\
             <td class=\"state-{state}\">{state}</td><td>{user}</td><td>{searcher}</td>\
             <td>{metric} ({mode})</td><td>{steps}</td><td>{age}</td></tr>",
            id = escape(&sweep.sweep_id),
            state = escape(&sweep.state),
            user = escape(&sweep.submitter),
            searcher = escape(&sweep.searcher),
            metric = escape(&sweep.metric),
            mode = escape(&sweep.mode),
            steps = sweep.steps_used,
            age = age((now_ms - sweep.submitted_at_unix_ms) / 1000),
        );
    }
    body.push_str("</table>");
    if sweeps.is_empty() {
        body.push_str("<p>No sweeps yet: <code>cohort sweep SWEEP.toml</code>.</p>");
    }
    let live = sweeps.iter().any(|sweep| sweep.state == "running");
    page("sweeps", live, &body)
}

/// A sweep's page: what it is, its trials' curves (the best [`MAX_CHARTED_TRIALS`]) and its
/// leaderboard, best first, each trial linking to its jobs.
pub fn sweep_page(sweep: &SweepInfo, curves: &[TrialCurve], now_ms: i64) -> String {
    let mut body = format!(
        "<h1>{id} <small>{searcher} search</small></h1><p>state <b class=\"state-{state}\" \
         id=\"state\">{state}</b>, user {user}, {steps} steps used, submitted {age} ago</p>",
        id = escape(&sweep.sweep_id),
        searcher = escape(&sweep.searcher),
        state = escape(&sweep.state),
        user = escape(&sweep.submitter),
        steps = sweep.steps_used,
        age = age((now_ms - sweep.submitted_at_unix_ms) / 1000),
    );
    if !sweep.reason.is_empty() {
        let _ = write!(body, "<p id=\"reason\">{}</p>", escape(&sweep.reason));
    }
    let names: Vec<String> = curves
        .iter()
        .map(|curve| format!("trial {}", curve.trial))
        .collect();
    let series: Vec<Series<'_>> = curves
        .iter()
        .zip(&names)
        .map(|(curve, name)| Series {
            name,
            points: curve.points.clone(),
        })
        .collect();
    body.push_str(&line_chart(
        "trials-chart",
        &format!("{} of the trials", sweep.metric),
        "step",
        &series,
    ));
    let _ = write!(
        body,
        "<table id=\"trials\"><tr><th>trial</th><th>{}</th><th>rung</th><th>steps</th>\
         <th>state</th><th>parameters</th><th>jobs</th></tr>",
        escape(&sweep.metric)
    );
    for trial in &sweep.trials {
        let mut parameters: Vec<String> = trial
            .parameters
            .iter()
            .map(|(path, value)| format!("{path} = {value}"))
            .collect();
        parameters.sort();
        let jobs: Vec<String> = trial
            .job_ids
            .iter()
            .map(|job| format!("<a href=\"/jobs/{id}\">{id}</a>", id = escape(job)))
            .collect();
        let _ = write!(
            body,
            "<tr class=\"trial\" data-trial=\"{number}\"><td>{number}</td><td>{metric}</td>\
             <td>{rung}</td><td>{steps}</td><td>{state}</td><td>{parameters}</td>\
             <td>{jobs}</td></tr>",
            number = trial.trial,
            metric = trial
                .metric
                .map_or("-".to_owned(), |value| format!("{value:.4}")),
            rung = trial.rung,
            steps = trial.steps,
            state = escape(&trial.state),
            parameters = escape(&parameters.join(", ")),
            jobs = jobs.join(" "),
        );
    }
    body.push_str("</table>");
    page(&sweep.sweep_id, sweep.state == "running", &body)
}

#[cfg(test)]
mod tests {
    use cohort_proto::v1::TrialInfo;

    use super::*;

    fn sweep() -> SweepInfo {
        SweepInfo {
            sweep_id: "lr-3".to_owned(),
            state: "running".to_owned(),
            searcher: "asha".to_owned(),
            metric: "eval_accuracy".to_owned(),
            mode: "max".to_owned(),
            submitter: "<b>mallory</b>".to_owned(),
            steps_used: 120,
            trials: vec![
                TrialInfo {
                    trial: 2,
                    parameters: [("optimizer.lr".to_owned(), "0.003".to_owned())].into(),
                    metric: Some(0.8512),
                    rung: 1,
                    steps: 80,
                    state: "running".to_owned(),
                    job_ids: vec!["lr-t2-5".to_owned(), "lr-t2-9".to_owned()],
                },
                TrialInfo {
                    trial: 0,
                    state: "stopped".to_owned(),
                    ..TrialInfo::default()
                },
            ],
            ..SweepInfo::default()
        }
    }

    #[test]
    fn a_sweep_page_shows_its_leaderboard_in_order_with_links_and_escapes_what_it_quotes() {
        let curves = [TrialCurve {
            trial: 2,
            points: vec![(20.0, 0.8), (80.0, 0.8512)],
        }];
        let html = sweep_page(&sweep(), &curves, 10_000);
        assert!(html.contains("&lt;b&gt;mallory&lt;/b&gt;"), "{html}");
        assert!(!html.contains("<b>mallory"));
        let first = html.find("data-trial=\"2\"").unwrap();
        let second = html.find("data-trial=\"0\"").unwrap();
        assert!(first < second, "best first");
        assert!(html.contains("<a href=\"/jobs/lr-t2-9\">lr-t2-9</a>"));
        assert!(html.contains("0.8512") && html.contains("optimizer.lr = 0.003"));
        assert_eq!(
            html.matches("class=\"point\"").count(),
            2,
            "both points drawn"
        );
        assert!(
            html.contains("location.reload"),
            "a running sweep's page refreshes"
        );
    }

    #[test]
    fn the_sweeps_page_lists_newest_first() {
        let mut older = sweep();
        older.sweep_id = "old-1".to_owned();
        older.state = "succeeded".to_owned();
        let html = sweeps_page(&[older, sweep()], 10_000);
        assert!(html.find("lr-3").unwrap() < html.find("old-1").unwrap());
        assert!(sweeps_page(&[], 0).contains("No sweeps yet"));
    }
}
