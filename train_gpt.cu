// train_gpt.cu — trains a GPT (filled in by the programs issue).
#include "tricycle.h"

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: ./train_gpt [flags]\n(not yet implemented)\n");
        return 0;
    }
    fprintf(stderr, "train_gpt: not yet implemented\n");
    return 1;
}
