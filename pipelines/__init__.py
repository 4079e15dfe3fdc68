"""Pipeline composition only: imports kfp, kfp-kubernetes and components — never torch."""
