{
 "format": "secure-split-policy-signature-v1",
 "peer": "lab",
 "policy": "hospitals-lab",
 "policy_hash": "dc88bda861762c02b8ebc9b175c6840323231aa8cf0776499b013721500ebf2f",
 "policy_version": 2,
 "sign_key": "92e99a109e2b19ba29148c1c3ba41007f4cb5c48184ea16a2321fbb422765294",
 "signature": "9c5ab18cbbf6e976fe2482bf2ec96586db32acf339d523033a9a2c3109ca438fc39582c57811f2a0bf85817e5b01e53d2cc9efc462a44ffce845e6def438730c"
}
