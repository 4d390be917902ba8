//! The web dashboard in a real browser: headless Chromium logs in through the one-time link of
//! `cohort dashboard` and reads the jobs table and a training job's page during and after the
//! job (its loss chart holds a point for every step the job's rank 0 reported); a screenshot
//! of the job page is left in `target/tmp`. Without a session, or with a used link, the
//! dashboard refuses.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use cohort_cluster_tests::chromium::Chromium;
use cohort_cluster_tests::external::http_get;
use cohort_cluster_tests::jobs::mlp_job;
use cohort_cluster_tests::sandbox::{Sandbox, SandboxOptions, poll};
use serde_json::Value;

/// Longest the training job may take on a slow machine.
const TRAINING_TIMEOUT: Duration = Duration::from_secs(600);

/// A fresh login link from `cohort dashboard` (to job `job`'s page when given).
fn login_link(cluster: &Sandbox, job: Option<&str>) -> Result<String> {
    let mut arguments = vec!["dashboard"];
    if let Some(job) = job {
        arguments.extend(["--job", job]);
    }
    let output = cluster.cli_ok(&arguments)?;
    Ok(output.trim().to_owned())
}

/// The points of the chart with element id `chart` in a page's DOM.
fn chart_points(dom: &str, chart: &str) -> Result<usize> {
    let start = dom
        .find(&format!("id=\"{chart}\""))
        .with_context(|| format!("no {chart} in the page"))?;
    let end = start
        + dom[start..]
            .find("</figure>")
            .context("an unclosed chart")?;
    Ok(dom[start..end].matches("class=\"point\"").count())
}

#[test]
fn chromium_shows_the_jobs_table_and_a_training_jobs_curves() -> Result<()> {
    let Some(chromium) = Chromium::find_or_skip("chromium_shows_the_jobs_table") else {
        return Ok(());
    };
    let mut cluster = Sandbox::start_with_options(SandboxOptions {
        http: true,
        ..SandboxOptions::default()
    })?;
    let http: SocketAddr = cluster
        .http_address()
        .context("the HTTP endpoint")?
        .parse()?;
    cluster.add_worker("node-a", 1)?;
    cluster.add_worker("node-b", 1)?;
    let job_id = cluster.submit(&mlp_job("charted", 2, 1, Some(150), 0.002, ""), &[])?;

    // During the job: the jobs table lists it, and its page charts what it reported so far.
    poll("the job to report steps", TRAINING_TIMEOUT, || {
        let job = cluster.job(&job_id)?;
        Ok((job["metrics"][0]["step"].as_u64().unwrap_or(0) >= 10).then_some(()))
    })?;
    let jobs = chromium.dump_dom(&login_link(&cluster, None)?)?;
    assert!(jobs.contains(&format!("data-job=\"{job_id}\"")), "{jobs}");
    let page = chromium.dump_dom(&login_link(&cluster, Some(&job_id))?)?;
    if page.contains("id=\"state\">running") {
        assert!(chart_points(&page, "loss-chart")? >= 1, "{page}");
    }

    // After the job: the loss chart has a point for each step rank 0 reported.
    cluster.wait_for_state(&job_id, "succeeded", TRAINING_TIMEOUT)?;
    let curves: Value = serde_json::from_str(
        &cluster.cli_ok(&["metrics", &job_id, "--rank", "0", "--output", "json"])?,
    )?;
    let reported = curves["ranks"][0]["points"]
        .as_array()
        .context("no points")?
        .len();
    let link = login_link(&cluster, Some(&job_id))?;
    let page = chromium.dump_dom(&link)?;
    assert!(page.contains("id=\"state\">succeeded"), "{page}");
    let charted = chart_points(&page, "loss-chart")?;
    eprintln!("loss chart: {charted} points for {reported} reported");
    assert_eq!(charted, reported, "{page}");
    assert!(chart_points(&page, "evaluation-loss-chart")? >= 1, "{page}");
    assert!(
        chart_points(&page, "evaluation-accuracy-chart")? >= 1,
        "{page}"
    );
    assert!(page.contains("id=\"log\""), "{page}");
    assert!(
        page.contains("final test accuracy"),
        "the folded log tail: {page}"
    );

    // The link was used: it works no more, and no page opens without a session.
    let path = &link[link.find("/login").context("a login path")?..];
    let (status, _) = http_get(http, path, None)?;
    assert_eq!(status, 401, "a used link");
    let (status, body) = http_get(http, &format!("/jobs/{job_id}"), None)?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("cohort dashboard"), "{body}");

    let nodes = chromium.dump_dom(&format!("{}&next=/nodes", login_link(&cluster, None)?))?;
    assert!(nodes.contains("<h1>Nodes</h1>"), "{nodes}");
    assert!(nodes.contains("<td>node-a</td>"), "{nodes}");

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-job.png");
    chromium.screenshot(
        &login_link(&cluster, Some(&job_id))?,
        &screenshot,
        1280,
        1700,
    )?;
    eprintln!("screenshot of the job page: {}", screenshot.display());
    Ok(())
}
