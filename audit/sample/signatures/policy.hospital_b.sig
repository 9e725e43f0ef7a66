{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_b",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "b420a71fdfc6916c750c0d0f88e6ad7d0023031df9adbd18b9919fdc7cb4ff71",
 "policy_version": 1,
 "sign_key": "842d9c014ed8182fda192b78b6feb4819242408441dcbe9db3f4038af9c0f76b",
 "signature": "32803f85fb2b97e0c316fdc37103ae1cf383d8a5f04ab8d58663a8a20443ddfa6449693bd939bf5012acd270c622542d0e2c245cda7924421077a12a7bfd6b04"
}
