{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_a",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "b420a71fdfc6916c750c0d0f88e6ad7d0023031df9adbd18b9919fdc7cb4ff71",
 "policy_version": 1,
 "sign_key": "b56ddc49f14b48457ed9b67f10ecfbab12a02af9e55961dc46edbd3c9911242f",
 "signature": "379a9904d181e2261e295009a27057e7dad34b663fbd48a1a8888cb4755f227b03e7d6ce83a944efc8320611cc25286ca3996ffd324035a0eb0d504a7e015903"
}
