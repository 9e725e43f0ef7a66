{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_a",
 "policy": "hospitals-lab",
 "policy_hash": "0453fc3d06ca6852e5b185922ab145ead1132951081c50551a55fcf0d4b00ba3",
 "policy_version": 1,
 "sign_key": "dd1d21527a7a3225bd073634c3c02ce9e64d5b74f13fd79bf760aff8b292cb5a",
 "signature": "5196ebd211a484c8b3888f015f67f935804d1b79a8281edd4034edf10423240f8103eb07b6bfee1fb5ffe475ce93f3a82a6f414aa6bd413da0dd25147d75050a"
}
