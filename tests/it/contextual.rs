//! The contextual model: a disjoint linear model per arm learns an item order that depends on
//! the shopper's context, measured against a simulator's truth (`simulate::ContextShop`) by
//! Kendall's τ per context (the table: `cargo bench --bench contextual`).

use banditflow::simulate::{self, context_config as config, context_examination, context_tau, ContextShop};

#[test]
fn the_item_order_per_context_is_learned_at_its_defaults() {
    // 100 items whose appeal depends on three context features; 1 M uniformly random slates
    // of 5 (position-biased clicks). The linear model is configured with its features' names
    // and every other setting at its default.
    let shop = ContextShop::new(100, 3, 5);
    let impressions: usize = std::env::var("BANDITFLOW_CONTEXT_IMPRESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let log = simulate::uniform_log(&shop, "m", impressions, 5, context_examination, 1);
    let tau_of = |model: &str| {
        let c = config(model).expect("config");
        let state = simulate::learn_records(&c.core, &log);
        context_tau(&c.core.models[0], &state.models[0], &shop)
    };
    let tau = tau_of("algorithm = \"linear\"\nlinear = { features = [\"f0\", \"f1\", \"f2\"] }");
    // The same data through the context-free Beta model: what ignoring the context costs.
    let tau_beta = tau_of("algorithm = \"beta\"");
    println!("Kendall τ per context at {impressions} impressions: linear {tau:.3}, beta {tau_beta:.3}");
    assert!(tau >= 0.85, "linear τ {tau:.3}");
    assert!(tau_beta < 0.75, "the context-free model must not reach it: τ {tau_beta:.3}");
}
