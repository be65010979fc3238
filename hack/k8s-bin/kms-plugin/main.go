// Command kms-plugin is a Kubernetes KMS v2 plugin for tests: it serves the real protocol
// (k8s.io/kms/pkg/service.NewGRPCService) on a Unix socket and encrypts with AES-256-GCM under
// one key read from a file (generated into it if the file does not exist). It is a test tool,
// not a KMS: the key sits in a file next to it.
//
//	kms-plugin --listen /tmp/x/kms.sock --key-file /tmp/x/kek [--key-id ID]
//
// Encrypt returns the ciphertext, the key id, and the nonce as the annotation
// "nonce.kms.claw-secrets.test", so Decrypt fails unless the caller passes back both the key id
// and the annotations the EncryptResponse had (as kube-apiserver does).
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/kms/pkg/service"
)

const nonceAnnotation = "nonce.kms.claw-secrets.test"

type plugin struct {
	aead  cipher.AEAD
	keyID string
}

func (p *plugin) Encrypt(_ context.Context, uid string, data []byte) (*service.EncryptResponse, error) {
	nonce := make([]byte, p.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	log.Printf("encrypt uid=%s bytes=%d", uid, len(data))
	return &service.EncryptResponse{
		Ciphertext:  p.aead.Seal(nil, nonce, data, []byte(p.keyID)),
		KeyID:       p.keyID,
		Annotations: map[string][]byte{nonceAnnotation: nonce},
	}, nil
}

func (p *plugin) Decrypt(_ context.Context, uid string, req *service.DecryptRequest) ([]byte, error) {
	log.Printf("decrypt uid=%s bytes=%d", uid, len(req.Ciphertext))
	if req.KeyID != p.keyID {
		return nil, fmt.Errorf("unknown key id %q (this plugin has %q)", req.KeyID, p.keyID)
	}
	nonce, ok := req.Annotations[nonceAnnotation]
	if !ok || len(nonce) != p.aead.NonceSize() {
		return nil, errors.New("the annotation " + nonceAnnotation + " is missing or invalid")
	}
	plain, err := p.aead.Open(nil, nonce, req.Ciphertext, []byte(p.keyID))
	if err != nil {
		return nil, errors.New("the ciphertext does not open under this plugin's key")
	}
	return plain, nil
}

func (p *plugin) Status(context.Context) (*service.StatusResponse, error) {
	return &service.StatusResponse{Version: "v2", Healthz: "ok", KeyID: p.keyID}, nil
}

func loadKey(path string) ([]byte, error) {
	key, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		return key, os.WriteFile(path, key, 0o600)
	}
	if err != nil {
		return nil, err
	}
	if len(key) != 32 {
		return nil, fmt.Errorf("%s holds %d bytes, not a 32-byte key", path, len(key))
	}
	return key, nil
}

func main() {
	listen := flag.String("listen", "", "Unix socket path to serve on (replaced if it exists)")
	keyFile := flag.String("key-file", "", "32-byte AES key; generated into the file if absent")
	keyID := flag.String("key-id", "", "key id to report (default: from the key's SHA-256)")
	flag.Parse()
	log.SetPrefix("kms-plugin: ")
	if *listen == "" || *keyFile == "" {
		log.Fatal("usage: kms-plugin --listen SOCKET --key-file FILE [--key-id ID]")
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		log.Fatalf("key: %v", err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		log.Fatal(err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		log.Fatal(err)
	}
	id := *keyID
	if id == "" {
		sum := sha256.Sum256(key)
		id = "test-kek-" + hex.EncodeToString(sum[:4])
	}
	_ = os.Remove(*listen)
	svc := service.NewGRPCService(*listen, 10*time.Second, &plugin{aead: aead, keyID: id})
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		svc.Close()
	}()
	log.Printf("serving KMS v2 on %s, key id %s", *listen, id)
	if err := svc.ListenAndServe(); err != nil && !errors.Is(err, context.Canceled) {
		// grpc.Server.Serve returns nil after Stop.
		log.Fatal(err)
	}
}
