{
 "format": "secure-split-policy-signature-v1",
 "peer": "lab",
 "policy": "hospitals-lab",
 "policy_hash": "0453fc3d06ca6852e5b185922ab145ead1132951081c50551a55fcf0d4b00ba3",
 "policy_version": 1,
 "sign_key": "92e99a109e2b19ba29148c1c3ba41007f4cb5c48184ea16a2321fbb422765294",
 "signature": "d584fd16892a61488938f5a50a113ae74b455139a56265b043362e8251fee837ddf1c17717bcbe9045ec1499acabd50541841d7b38e9e7610333be3917e2420d"
}
