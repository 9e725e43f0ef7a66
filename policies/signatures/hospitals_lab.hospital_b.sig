{
 "format": "secure-split-policy-signature-v1",
 "peer": "hospital_b",
 "policy": "hospitals-lab",
 "policy_hash": "dc88bda861762c02b8ebc9b175c6840323231aa8cf0776499b013721500ebf2f",
 "policy_version": 2,
 "sign_key": "55624b6ec4f336c152625b01bca449cd380e2574038f3b711d54afcf53d7a980",
 "signature": "2ec8282398f53c426447119c0c323f3e88f15334b84006d51631571573855ce0092775c4e7cd3abaf315ada410e347329282abaa1ffe28d74d5cbd52432ee70c"
}
