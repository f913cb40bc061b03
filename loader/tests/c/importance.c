/* The importance calls of the C ABI (issue 14), as an engine's selector would make them:
 * size queries first, then the scores of a cached prefix and the groups a pruned load keeps.
 * Run by loader/tests/ffi_importance.rs: argv[1] is the cache directory (preset "tiny",
 * tokens 0..N-1 cached with importance), argv[2] N, argv[3] the share. Prints the figures
 * for the test to compare with the Rust API. */
#include <kvfs.h>
#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what, int rc) {
    fprintf(stderr, "%s: %d %s\n", what, rc, kvfs_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    size_t n = (size_t)atol(argv[2]);
    double share = atof(argv[3]);
    uint32_t *tokens = malloc(n * sizeof *tokens);
    for (size_t i = 0; i < n; i++) tokens[i] = (uint32_t)i;
    kvfs_loader *l;
    int rc = kvfs_open(argv[1], "tiny", NULL, NULL, 0, &l);
    if (rc != KVFS_OK) return fail("open", rc);

    size_t chunks, groups;
    rc = kvfs_importance(l, tokens, n, n, NULL, 0, &chunks, &groups);
    if (rc != KVFS_OK) return fail("importance size", rc);
    size_t layers = 2; /* the tiny preset */
    size_t len = chunks * layers * groups;
    float *scores = malloc(len * sizeof *scores);
    rc = kvfs_importance(l, tokens, n, n, scores, len, &chunks, &groups);
    if (rc != KVFS_OK) return fail("importance", rc);
    printf("chunks %zu groups %zu\n", chunks, groups);
    for (size_t i = 0; i < len; i++) printf("score %zu %.9g\n", i, scores[i]);

    size_t k;
    rc = kvfs_importance_selection(l, tokens, n, n, share, NULL, 0, &k);
    if (rc != KVFS_OK) return fail("selection size", rc);
    uint32_t *kept = malloc(layers * k * sizeof *kept);
    rc = kvfs_importance_selection(l, tokens, n, n, share, kept, layers * k, &k);
    if (rc != KVFS_OK) return fail("selection", rc);
    for (size_t layer = 0; layer < layers; layer++) {
        printf("layer %zu:", layer);
        for (size_t i = 0; i < k; i++) printf(" %u", kept[layer * k + i]);
        printf("\n");
    }
    /* a buffer one value short is refused, and says so */
    rc = kvfs_importance_selection(l, tokens, n, n, share, kept, layers * k - 1, &k);
    printf("short buffer: %d\n", rc);
    kvfs_close(l);
    free(kept);
    free(scores);
    free(tokens);
    return 0;
}
