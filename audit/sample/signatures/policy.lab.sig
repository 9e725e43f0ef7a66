{
 "format": "secure-split-policy-signature-v1",
 "peer": "lab",
 "policy": "demo-vertical-he-v1",
 "policy_hash": "b420a71fdfc6916c750c0d0f88e6ad7d0023031df9adbd18b9919fdc7cb4ff71",
 "policy_version": 1,
 "sign_key": "a78e403733419bb1a1d763705671bcae64fc708649dedbfcee8b001f80d4c0ac",
 "signature": "acc22aa0250f873ba47d6bf72356745474f4bcef6da29a815b25db57f1e47771844a7c171fb040d8690c46d2c87172859048591a2b00f11842e539cb85d57709"
}
