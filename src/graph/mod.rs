//! Graph API vocabulary, free of any request-path state: the query string,
//! routes and the objects a request names, the batch wire format, usage
//! headers and paging links (contract: `../shared/graph-api.md`).

pub mod batch;
pub mod jobs;
pub mod members;
pub mod paging;
pub mod query;
pub mod routes;
pub mod usage;
