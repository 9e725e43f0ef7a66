{
 "format": "secure-split-policy-signature-v1",
 "peer": "lab",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "08865d025f0db1034d683ea6e550ee3f6b4d268ffa174be60ef7d30e0196119f",
 "policy_version": 1,
 "sign_key": "f6150b1038479a90e7df8768b8810533c163bcbbfc17f3788dd78ed6fb90668c",
 "signature": "46487ee1eacb49d20b68f3ec5f5c7467deff78c9f26dd1c650c5aee5bee9a48232115999ff8bb4895af7d7aa0ad37fe48e33b82895cc2e89b567f6f82255f201"
}
