{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_a",
 "policy": "hospitals-lab",
 "policy_hash": "dc88bda861762c02b8ebc9b175c6840323231aa8cf0776499b013721500ebf2f",
 "policy_version": 2,
 "sign_key": "dd1d21527a7a3225bd073634c3c02ce9e64d5b74f13fd79bf760aff8b292cb5a",
 "signature": "6ba62bee8afef034ec6cd8411cc9fa225609ff1a12e89cb0b31715a6b462e9cc3897cae9e7586595d4e14b083e028b60346ceea8f3cd57c36b748fc46a70e907"
}
