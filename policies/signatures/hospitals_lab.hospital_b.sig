{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_b",
 "policy": "hospitals-lab",
 "policy_hash": "0453fc3d06ca6852e5b185922ab145ead1132951081c50551a55fcf0d4b00ba3",
 "policy_version": 1,
 "sign_key": "55624b6ec4f336c152625b01bca449cd380e2574038f3b711d54afcf53d7a980",
 "signature": "dd466415a51106b0c91e54e336fdee854b0df9f3d6911fbd182a9654848303a6cadc10b7bfa9d0cfedc45d03bd5a913b88fa8822a3ed8daf03b18b0f2d4a2409"
}
