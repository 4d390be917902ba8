//! `cohort users` and `cohort audit`: the cluster's users and its audit log (admins only).

use std::process::ExitCode;

use anyhow::Result;
use cohort_proto::v1::{
    AddUserRequest, AuditRecord, ListAuditRequest, ListUsersRequest, RemoveUserRequest, UserInfo,
};
use serde_json::json;

use crate::args::{AuditArgs, OutputFormat, UsersAction, UsersArgs};
use crate::client;
use crate::render;

/// Most audit pages `cohort audit` follows (each up to 1,000 entries; the log keeps 100,000).
const MAX_AUDIT_PAGES: usize = 1_000;

/// `cohort users add|list|remove`.
pub async fn users(args: UsersArgs) -> Result<ExitCode> {
    match args.action {
        UsersAction::Add {
            name,
            admin,
            coordinator,
        } => {
            let mut client = client::job_control(&coordinator.target()?).await?;
            let added = client
                .add_user(AddUserRequest {
                    name: name.clone(),
                    admin,
                })
                .await
                .map_err(client::status)?
                .into_inner();
            let role = if admin { "admin" } else { "user" };
            eprintln!("cohort: added {role} {name}; their token (shown this once):");
            println!("{}", added.token);
        }
        UsersAction::List {
            output,
            coordinator,
        } => {
            let mut client = client::job_control(&coordinator.target()?).await?;
            let users = client
                .list_users(ListUsersRequest {})
                .await
                .map_err(client::status)?
                .into_inner()
                .users;
            match output {
                OutputFormat::Json => {
                    let list: Vec<_> = users.iter().map(user_json).collect();
                    println!("{}", serde_json::Value::Array(list));
                }
                OutputFormat::Table => print!("{}", users_table(&users)),
            }
        }
        UsersAction::Remove { name, coordinator } => {
            let mut client = client::job_control(&coordinator.target()?).await?;
            client
                .remove_user(RemoveUserRequest { name: name.clone() })
                .await
                .map_err(client::status)?;
            eprintln!("cohort: removed {name}; their token no longer works");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `cohort audit`: every audit entry after `--after`, oldest first, following pages.
pub async fn audit(args: AuditArgs) -> Result<ExitCode> {
    let mut client = client::job_control(&args.coordinator.target()?).await?;
    let mut entries: Vec<AuditRecord> = Vec::new();
    let mut after_seq = args.after;
    for _ in 0..MAX_AUDIT_PAGES {
        let page = client
            .list_audit(ListAuditRequest {
                after_seq,
                limit: 0,
            })
            .await
            .map_err(client::status)?
            .into_inner()
            .entries;
        let Some(last) = page.last() else {
            break;
        };
        after_seq = last.seq;
        entries.extend(page);
    }
    match args.output {
        OutputFormat::Json => {
            let list: Vec<_> = entries.iter().map(audit_json).collect();
            println!("{}", serde_json::Value::Array(list));
        }
        OutputFormat::Table => print!("{}", audit_table(&entries)),
    }
    Ok(ExitCode::SUCCESS)
}

fn user_json(user: &UserInfo) -> serde_json::Value {
    json!({
        "name": user.name,
        "admin": user.admin,
        "created_at_unix_ms": user.created_at_unix_ms,
        "created_by": user.created_by,
    })
}

fn audit_json(entry: &AuditRecord) -> serde_json::Value {
    json!({
        "seq": entry.seq,
        "at_unix_ms": entry.at_unix_ms,
        "actor": entry.actor,
        "action": entry.action,
        "target": entry.target,
        "outcome": entry.outcome,
    })
}

fn users_table(users: &[UserInfo]) -> String {
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|user| {
            vec![
                user.name.clone(),
                if user.admin { "admin" } else { "user" }.to_owned(),
                render::timestamp(user.created_at_unix_ms),
                user.created_by.clone(),
            ]
        })
        .collect();
    render::table(&["NAME", "ROLE", "CREATED", "BY"], &rows)
}

fn audit_table(entries: &[AuditRecord]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|entry| {
            vec![
                entry.seq.to_string(),
                render::timestamp(entry.at_unix_ms),
                entry.actor.clone(),
                entry.action.clone(),
                entry.target.clone(),
                entry.outcome.clone(),
            ]
        })
        .collect();
    render::table(
        &["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME"],
        &rows,
    )
}
