"""Training of parameter-efficient modules: SFT (expert / anti-expert), SKU, unlearning baselines."""
