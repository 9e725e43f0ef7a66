{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_a",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "08865d025f0db1034d683ea6e550ee3f6b4d268ffa174be60ef7d30e0196119f",
 "policy_version": 1,
 "sign_key": "53f74d4d82fde957e467ab23af8a364b1872d8756061f2069a86b7089722acb5",
 "signature": "662cd5305ecf2325ba2d9f0e23a931f446fdebf22fa9ed81284e47defce26fdcff4b0a5e0e1e259d3cfe47a7b0f9ced66cec056e07c82241ab2ebf7b131a280a"
}
