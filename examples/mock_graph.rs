//! A local stand-in for graph.facebook.com, to watch graphcache's hits,
//! revalidations and metrics without a Facebook token. It is the same mock
//! the integration tests use.
//!
//!     cargo run --example mock-graph -- 127.0.0.1:8089
//!     graphcache --upstream http://127.0.0.1:8089

#[path = "../tests/support/mock_graph.rs"]
mod mock_graph;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8089".to_owned())
        .parse()
        .expect("an address such as 127.0.0.1:8089");
    let mock = mock_graph::MockGraph::start_on(addr).await;
    // An origin delay, for the performance race's cold-burst scenario.
    if let Some(ms) = std::env::var("MOCK_GRAPH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        mock.set_delay(std::time::Duration::from_millis(ms));
    }
    println!("mock Graph API listening on {}", mock.url());
    println!(
        "try: curl -i '{}/v26.0/act_1/campaigns?access_token=demo'",
        mock.url()
    );
    let mut last = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if mock.requests() != last {
            last = mock.requests();
            println!(
                "requests received: {last}, conditional: {}, answered 304: {}, writes: {}",
                mock.conditional(),
                mock.not_modified(),
                mock.writes()
            );
        }
    }
}
