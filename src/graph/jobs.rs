//! Marketing API async jobs (contract §7): request sets created by
//! `act_<id>/async_batch_requests` or `act_<id>/asyncadrequestsets`, and
//! insights report runs created by a POST to `act_<id>/insights`. While a
//! job runs its status changes; once it has finished, neither its status
//! nor its results (`<set>/requests`, `<run>/insights`) change again. These
//! pure functions tell the request path which is which.

use serde_json::Value;

use crate::graph::routes::{strip_version, ObjectId};

/// Where a job stands, as its answers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Created or still running: its status changes.
    Running,
    /// Finished: its status and results are final.
    Finished,
}

/// What a read of a job's id asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRead {
    /// `GET /<id>`: the job's status.
    Status,
    /// `GET /<set>/requests` or `GET /<run>/insights`: its results.
    Results,
}

/// The node of `path` and what reading it asks of a job, if the path could
/// be a job's: `<id>` or `<id>/requests` or `<id>/insights`, nothing more.
pub fn job_read(path: &str) -> Option<(&str, JobRead)> {
    let mut segments = strip_version(path).split('/').filter(|s| !s.is_empty());
    let node = segments.next()?;
    let read = match segments.next() {
        None => JobRead::Status,
        Some("requests" | "insights") => JobRead::Results,
        Some(_) => return None,
    };
    if segments.next().is_some() || node.starts_with("act_") {
        return None;
    }
    Some((node, read))
}

/// True for a write that creates a job: a POST to an ad account's
/// `async_batch_requests`, `asyncadrequestsets` or `insights` edge.
pub fn creates_job(path: &str) -> bool {
    let mut segments = strip_version(path).split('/').filter(|s| !s.is_empty());
    matches!(
        (segments.next(), segments.next(), segments.next()),
        (Some(node), Some("async_batch_requests" | "asyncadrequestsets" | "insights"), None)
            if node.starts_with("act_")
    )
}

/// The id of the job a creating write's reply names: `{"id": …}` for a
/// request set, `{"report_run_id": …}` for a report run.
pub fn created_job(reply: &[u8]) -> Option<ObjectId> {
    let value: Value = serde_json::from_slice(reply).ok()?;
    let id = value.get("report_run_id").or_else(|| value.get("id"))?;
    match id {
        Value::String(id) => ObjectId::parse(id),
        Value::Number(id) => ObjectId::parse(&id.to_string()),
        _ => None,
    }
}

/// Where a status answer of `node` says its job stands, or None when it is
/// not a job's status. It must have a job's shape, so another object's
/// field of the same name teaches nothing: its own `id`, and `is_completed`
/// with `total_count` (a request set) or `async_status` with
/// `async_percent_completion` (a report run). A request set is finished when
/// `is_completed` is true; a report run when `async_status` is `Job
/// Completed` (`Job Failed` and `Job Skipped` are final too, but their
/// results are errors, which are never stored anyway).
pub fn job_state(body: &[u8], node: &str) -> Option<JobState> {
    // Cheap test first: most answers are not job statuses.
    let mentions = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    if !mentions(b"\"is_completed\"") && !mentions(b"\"async_status\"") {
        return None;
    }
    let value: Value = serde_json::from_slice(body).ok()?;
    if value.get("id").and_then(Value::as_str) != Some(node) {
        return None;
    }
    if let Some(done) = value.get("is_completed").and_then(Value::as_bool) {
        value.get("total_count")?;
        return Some(if done {
            JobState::Finished
        } else {
            JobState::Running
        });
    }
    value.get("async_percent_completion")?;
    let status = value.get("async_status")?.as_str()?;
    Some(match status {
        "Job Completed" | "Job Failed" | "Job Skipped" => JobState::Finished,
        _ => JobState::Running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn job_reads_are_a_node_its_requests_or_its_insights() {
        assert_eq!(job_read("/v26.0/6001"), Some(("6001", JobRead::Status)));
        assert_eq!(job_read("/v26.0/6001/"), Some(("6001", JobRead::Status)));
        assert_eq!(
            job_read("/v26.0/6001/requests"),
            Some(("6001", JobRead::Results))
        );
        assert_eq!(job_read("/6001/insights"), Some(("6001", JobRead::Results)));
        assert_eq!(job_read("/v26.0/6001/ads"), None);
        assert_eq!(job_read("/v26.0/6001/insights/x"), None);
        assert_eq!(
            job_read("/v26.0/act_1/insights"),
            None,
            "an account's own insights"
        );
        assert_eq!(job_read("/v26.0/"), None);
    }

    #[test]
    fn jobs_are_created_by_posts_to_an_accounts_async_edges() {
        assert!(creates_job("/v26.0/act_1/async_batch_requests"));
        assert!(creates_job("/v26.0/act_1/asyncadrequestsets/"));
        assert!(creates_job("/v26.0/act_1/insights"));
        assert!(!creates_job("/v26.0/act_1/ads"));
        assert!(!creates_job("/v26.0/6001/insights"));
        assert_eq!(created_job(br#"{"id":"6001"}"#).unwrap().as_str(), "6001");
        assert_eq!(
            created_job(br#"{"report_run_id":"7002"}"#)
                .unwrap()
                .as_str(),
            "7002"
        );
        assert_eq!(
            created_job(br#"{"report_run_id":7003}"#).unwrap().as_str(),
            "7003"
        );
        assert!(created_job(br#"{"success":true}"#).is_none());
        assert!(created_job(b"nope").is_none());
    }

    #[test]
    fn status_answers_say_where_the_job_stands() {
        use JobState::*;
        let set = |done: bool| format!(r#"{{"id":"1","is_completed":{done},"total_count":2}}"#);
        assert_eq!(job_state(set(true).as_bytes(), "1"), Some(Finished));
        assert_eq!(job_state(set(false).as_bytes(), "1"), Some(Running));
        let run = |status: &str| {
            format!(r#"{{"id":"2","async_status":"{status}","async_percent_completion":100}}"#)
        };
        assert_eq!(
            job_state(run("Job Completed").as_bytes(), "2"),
            Some(Finished)
        );
        assert_eq!(job_state(run("Job Running").as_bytes(), "2"), Some(Running));
        assert_eq!(job_state(run("Job Failed").as_bytes(), "2"), Some(Finished));
        // Not a job's status: another id, or a field of the name alone.
        assert_eq!(job_state(set(true).as_bytes(), "9"), None);
        assert_eq!(job_state(br#"{"id":"1","is_completed":true}"#, "1"), None);
        assert_eq!(
            job_state(br#"{"id":"2","async_status":"Job Completed"}"#, "2"),
            None
        );
        assert_eq!(job_state(br#"{"id":"3","name":"ad"}"#, "3"), None);
        assert_eq!(job_state(br#"{"is_completed":"#, "1"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn never_panic(body in proptest::collection::vec(any::<u8>(), 0..256), path in "[a-z0-9_/.]{0,40}") {
            let _ = job_state(&body, "1");
            let _ = created_job(&body);
            let _ = job_read(&path);
            let _ = creates_job(&path);
        }
    }
}
