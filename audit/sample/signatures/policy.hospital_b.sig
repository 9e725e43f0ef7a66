{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_b",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "08865d025f0db1034d683ea6e550ee3f6b4d268ffa174be60ef7d30e0196119f",
 "policy_version": 1,
 "sign_key": "cdedd75042c71c880205b6be5a42dd7d62d39b709f8b8fda5e853b9d9395b8cd",
 "signature": "b9afd99745ade847b966c18d3cf3ba3fdd5aa85dd3079bc9b3da709f854f67aafd76857d70050ade997f105418014e71d27d02dec525682fb4a0d21b0e18a806"
}
